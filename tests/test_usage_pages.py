"""The portal's Usage page and the admin's usage report, over the hand-computed history."""

from __future__ import annotations

import json

import pytest

from tests.usage_history import make_history

pytestmark = pytest.mark.django_db


@pytest.fixture
def history(acme, globex, alice, bob, carol):
    return make_history(acme, globex, alice, bob, carol)


def chart(response) -> dict:
    html = response.content.decode()
    start = html.index('id="usage-chart-data"')
    body = html[html.index(">", start) + 1:html.index("</script>", start)]
    return json.loads(body)


def test_a_plain_member_sees_the_tenant_total_and_only_their_own_line(history, client, bob):
    client.force_login(bob)
    response = client.get("/usage/?month=2026-10")
    assert response.status_code == 200
    html = response.content.decode()
    assert "acme" in html and "7.50" in html  # the tenant's total
    assert "bob" in html and "alice" not in html.split("By user")[1].split("By GPU model")[0]
    assert "globex" not in html
    assert "/static/vendor/chartjs/chart.umd.min.js" in html
    data = chart(response)
    assert len(data["labels"]) == 31
    (acme,) = data["datasets"]
    assert acme["label"] == "acme" and acme["data"][0] == 4.0 and acme["data"][1] == 1.0


def test_a_tenant_admin_sees_every_member(history, client, alice):
    client.force_login(alice)
    html = client.get("/usage/?month=2026-10").content.decode()
    by_user = html.split("By user")[1].split("By GPU model")[0]
    assert "alice" in by_user and "bob" in by_user and "6.50" in by_user


def test_a_bad_month_is_a_message_not_an_error(client, alice):
    client.force_login(alice)
    response = client.get("/usage/?month=October", follow=True)
    assert response.status_code == 200
    assert "bad month" in response.content.decode()


def test_the_admin_report_drills_down_from_tenants_to_users_and_gpu_models(history, client, staff):
    client.force_login(staff)
    response = client.get("/admin/usage/?month=2026-10")
    assert response.status_code == 200
    html = response.content.decode()
    assert "?month=2026-10&amp;tenant=acme" in html and "7.50" in html and "4.00" in html
    months = chart(response)
    assert months["labels"][-1] == "2026-10"
    assert {d["label"]: d["data"][-1] for d in months["datasets"]} == {"acme": 7.5, "globex": 4.0}

    drill = client.get("/admin/usage/?month=2026-10&tenant=acme")
    html = drill.content.decode()
    assert "Users of acme" in html and "6.50" in html and "NVIDIA A100 80GB" in html
    assert {d["label"] for d in chart(drill)["datasets"]} == {"alice", "bob"}


def test_the_admin_report_is_for_staff_only(client, alice):
    client.force_login(alice)
    assert client.get("/admin/usage/").status_code == 302
