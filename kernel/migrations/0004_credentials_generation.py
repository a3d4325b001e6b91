"""A credentials generation: a number that changes, in the same transaction, whenever
anything that decides whether a token is accepted changes (a token revoked, expired,
deleted or re-issued; a user disabled, demoted or deleted; a server renamed, deleted
or given a new token or another status). Web processes cache verified tokens only for as long as this
number is unchanged, so a revocation refuses the very next request in every process
(``kernel.tokens.VerifiedTokens``).

Triggers rather than Python hooks: a change made in the admin, a shell or a raw
UPDATE counts the same. The value comes from a sequence, so a number once used
(even by a rolled-back transaction) never comes back.
"""

from django.conf import settings
from django.db import migrations

FORWARD = """
CREATE SEQUENCE portal_credentials_generation_seq;
CREATE TABLE portal_credentials_generation (
    id smallint PRIMARY KEY CHECK (id = 1),
    value bigint NOT NULL
);
INSERT INTO portal_credentials_generation (id, value) VALUES (1, nextval('portal_credentials_generation_seq'));

CREATE FUNCTION portal_bump_credentials_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO portal_credentials_generation (id, value) VALUES (1, nextval('portal_credentials_generation_seq'))
    ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value;
    RETURN NULL;
END
$$;

-- Tokens: any change but the once-a-minute last_used_at stamp.
CREATE TRIGGER apitoken_credentials_changed AFTER UPDATE ON tenants_apitoken FOR EACH ROW
    WHEN (to_jsonb(OLD) - 'last_used_at' IS DISTINCT FROM to_jsonb(NEW) - 'last_used_at')
    EXECUTE FUNCTION portal_bump_credentials_generation();
CREATE TRIGGER apitoken_credentials_removed AFTER DELETE OR TRUNCATE ON tenants_apitoken FOR EACH STATEMENT
    EXECUTE FUNCTION portal_bump_credentials_generation();

-- Users: any change but the login stamp.
CREATE TRIGGER user_credentials_changed AFTER UPDATE ON auth_user FOR EACH ROW
    WHEN (to_jsonb(OLD) - 'last_login' IS DISTINCT FROM to_jsonb(NEW) - 'last_login')
    EXECUTE FUNCTION portal_bump_credentials_generation();
CREATE TRIGGER user_credentials_removed AFTER DELETE OR TRUNCATE ON auth_user FOR EACH STATEMENT
    EXECUTE FUNCTION portal_bump_credentials_generation();

-- Servers: any change but what every heartbeat writes (a status change counts).
CREATE TRIGGER node_credentials_changed AFTER UPDATE ON nodes_node FOR EACH ROW
    WHEN (to_jsonb(OLD) - '{last_heartbeat_at,updated_at,agent_version,hostname}'::text[]
          IS DISTINCT FROM to_jsonb(NEW) - '{last_heartbeat_at,updated_at,agent_version,hostname}'::text[])
    EXECUTE FUNCTION portal_bump_credentials_generation();
CREATE TRIGGER node_credentials_removed AFTER DELETE OR TRUNCATE ON nodes_node FOR EACH STATEMENT
    EXECUTE FUNCTION portal_bump_credentials_generation();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS apitoken_credentials_changed ON tenants_apitoken;
DROP TRIGGER IF EXISTS apitoken_credentials_removed ON tenants_apitoken;
DROP TRIGGER IF EXISTS user_credentials_changed ON auth_user;
DROP TRIGGER IF EXISTS user_credentials_removed ON auth_user;
DROP TRIGGER IF EXISTS node_credentials_changed ON nodes_node;
DROP TRIGGER IF EXISTS node_credentials_removed ON nodes_node;
DROP FUNCTION IF EXISTS portal_bump_credentials_generation();
DROP TABLE IF EXISTS portal_credentials_generation;
DROP SEQUENCE IF EXISTS portal_credentials_generation_seq;
"""


class Migration(migrations.Migration):

    dependencies = [
        ('portal', '0003_hearing_and_mass_silence_alert'),
        ('tenants', '0001_initial'),
        ('nodes', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
