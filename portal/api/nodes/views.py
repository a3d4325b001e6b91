"""The agent API (``/api/agent/v1/``): register, heartbeat, task events, log chunks.

Every view but ``register`` authenticates a node token and acts only for that
server. Bad payloads get a 400 naming the fields, and change nothing.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.db.models import F, Func
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from kernel import live
from kernel.alerts import raise_alert
from kernel.models import Alert
from nodes import heartbeat
from nodes.enrolment import EnrolmentError, redeem
from portal.api.nodes.auth import AgentRateThrottle, IsAgent, NodeTokenAuthentication, RegisterRateThrottle
from portal.api.nodes.serializers import (
    HeartbeatSerializer,
    LogChunksSerializer,
    RegisterSerializer,
    TaskEventSerializer,
    canonical_heartbeat,
)
from scheduling import assignments, lifecycle
from scheduling.models import Task, TaskLogChunk


def _timings() -> dict[str, int]:
    return {"heartbeat_interval_s": settings.SCHEDULER.heartbeat_interval_s,
            "heartbeat_timeout_s": settings.SCHEDULER.heartbeat_timeout_s,
            "agent_lease_s": settings.SCHEDULER.agent_lease_s}


class AgentView(APIView):
    schema = None  # the agents' own API: documented in the README, kept out of the user API schema
    authentication_classes = [NodeTokenAuthentication]
    permission_classes = [IsAgent]
    throttle_classes = [AgentRateThrottle]

    def actor(self, request: Request) -> str:
        return f"agent:{request.auth.name}"


class RegisterView(APIView):
    schema = None
    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes = [RegisterRateThrottle]

    def post(self, request: Request) -> Response:
        serializer = RegisterSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            enrolled = redeem(data["join_token"], name=data["name"], hostname=data["hostname"],
                              agent_version=data["agent_version"])
        except EnrolmentError as exc:
            return Response({"join_token": [str(exc)]}, status=status.HTTP_403_FORBIDDEN)
        return Response(
            {"node_id": enrolled.node.pk, "name": enrolled.node.name, "node_token": enrolled.node_token,
             "created": enrolled.created, **_timings()},
            status=status.HTTP_201_CREATED,
        )


class HeartbeatView(AgentView):
    def post(self, request: Request) -> Response:
        # A well-formed report skips DRF's nested validation (serializers.canonical_heartbeat);
        # any other goes through the serializer, which refuses it with field messages.
        data = canonical_heartbeat(request.data, request.auth)
        if data is None:
            serializer = HeartbeatSerializer(data=request.data, context={"node": request.auth})
            if not serializer.is_valid():
                return self.refused(request.auth, serializer.errors)
            data = serializer.validated_data
        try:
            result = heartbeat.ingest(request.auth, data)
        except heartbeat.HeartbeatRejected as exc:
            return self.refused(request.auth, exc.field_errors)
        return Response({
            **_timings(),
            "assignments_etag": assignments.current_etag(request.auth.pk),
            "cordoned": result.cordoned,
        })

    @staticmethod
    def refused(node, errors) -> Response:
        """A report the portal will not store (impossible values, a contradiction): the
        operator hears of it, as of a GPU error; one open alert per server."""
        raise_alert(Alert.Kind.GPU_ERROR, f"heartbeat of {node.name} refused: {str(dict(errors))[:400]}",
                    node=node.pk)
        return Response(errors, status=status.HTTP_400_BAD_REQUEST)


class TaskEventView(AgentView):
    def post(self, request: Request, task_id: int) -> Response:
        serializer = TaskEventSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        node, actor = request.auth, self.actor(request)
        kwargs = {"node_id": node.pk, "actor": actor, "attempt": data["attempt"], "rank": data["rank"]}
        try:
            if data["event"] == "ready":
                task = lifecycle.report_ready(task_id, address=data["address"], port=data["port"], **kwargs)
            elif data["event"] == "started":
                task = lifecycle.report_started(task_id, **kwargs)
            elif data["lost"]:
                task = lifecycle.report_lost(task_id, reason=data["reason"] or f"lost by the agent on {node.name}",
                                             **kwargs)
            else:
                reason = data["reason"]
                if data["duration_s"] is not None and not reason and data["exit_code"] not in (0, None):
                    reason = f"exit code {data['exit_code']} after {data['duration_s']:.1f} s"
                # The OOM alert (one per attempt) is raised by lifecycle.report_finished.
                task = lifecycle.report_finished(task_id, exit_code=data["exit_code"], oom=data["oom"],
                                                 timed_out=data["timed_out"], reason=reason, **kwargs)
        except Task.DoesNotExist:
            return Response({"detail": f"no task {task_id}"}, status=status.HTTP_404_NOT_FOUND)
        except PermissionError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        except ValueError as exc:
            return Response({"port": [str(exc)]}, status=status.HTTP_400_BAD_REQUEST)
        return Response({"id": task.pk, "status": task.status, "attempt": task.attempt})


class LogChunksView(AgentView):
    def post(self, request: Request, task_id: int) -> Response:
        serializer = LogChunksSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            task = Task.objects.filter(pk=task_id).only("node_id", "nodes", "attempt").first()
            if task is None:
                return Response({"detail": f"no task {task_id}"}, status=status.HTTP_404_NOT_FOUND)
            if not task.runs_on(request.auth.pk):
                return Response({"detail": f"task {task_id} is not assigned to this server"},
                                status=status.HTTP_409_CONFLICT)
            chunks = serializer.validated_data["chunks"]
            if any(c["attempt"] > task.attempt for c in chunks):
                # Never logs for an attempt that has not started (it may run elsewhere).
                return Response({"detail": f"task {task_id} is at attempt {task.attempt}"},
                                status=status.HTTP_409_CONFLICT)
            # Retried chunks hit the (task, attempt, offset) unique constraint and are skipped.
            TaskLogChunk.objects.bulk_create(
                [TaskLogChunk(task_id=task_id, attempt=c["attempt"], rank=c["rank"], offset=c["offset"],
                              data=c["data"])
                 for c in chunks],
                ignore_conflicts=True,
            )
            # Where each stored chunk ends, in bytes of the agent's file: an agent that
            # crashed after shipping a chunk but before noting it may resend from the same
            # offset with more text, and must continue from the end of what is stored.
            stored = (TaskLogChunk.objects
                      .filter(task_id=task_id, attempt__in={c["attempt"] for c in chunks},
                              rank__in={c["rank"] for c in chunks}, offset__in={c["offset"] for c in chunks})
                      .annotate(size=Func(F("data"), function="octet_length"))
                      .values_list("attempt", "rank", "offset", "size"))
            # "attempt:offset" for rank 0 (what one-server agents read), "attempt:rank:offset" otherwise.
            ends = {(f"{attempt}:{offset}" if not rank else f"{attempt}:{rank}:{offset}"): offset + size
                    for attempt, rank, offset, size in stored}
            live.log_appended(task_id)
        return Response({"stored": len(chunks), "ends": ends})
