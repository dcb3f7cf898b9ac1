"""kopf registrations of the FineTuneJob operator; the work happens in `finetune.operator.reconcile`.

Run it with `finetune operator` (see `finetune.operator.cli`), or in-process in tests:
`await kopf.operator(clusterwide=True, memo=kopf.Memo(config=OperatorConfig(...)))` after importing
this module (importing registers the handlers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from finetune.operator import k8s, naming
from finetune.operator.config import OperatorConfig
from finetune.operator.metrics import PhaseCounts, init_series, start_server, timed
from finetune.operator.reconcile import Reconciler, Wait
from finetune.spec import GROUP, PLURAL, VERSION, SpecError

FTJ = (GROUP, VERSION, PLURAL)
CHILD = {naming.LABEL_MANAGED_BY: naming.MANAGER}
TRAINER_CHILD = {**CHILD, naming.LABEL_COMPONENT: naming.TRAINER}
SERVER_CHILD = {**CHILD, naming.LABEL_COMPONENT: naming.SERVER}
WATCHED_CHILDREN: dict[tuple[str, str, str], dict[str, str]] = {
    ("jobset.x-k8s.io", "v1alpha2", "jobsets"): TRAINER_CHILD,
    ("", "v1", "pods"): TRAINER_CHILD,
    ("apps", "v1", "deployments"): SERVER_CHILD,
}
log = logging.getLogger(__name__)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """All kopf tuning, the API client and the /metrics server, in one place."""
    config: OperatorConfig = memo.get("config") or OperatorConfig.from_env()
    cluster: k8s.Cluster = memo.get("cluster") or k8s.Cluster.discover()
    memo.cluster = cluster
    # Keep kopf's bookkeeping in annotations under our own prefix: the CRD's status schema is typed,
    # and a real API server would prune kopf's default `status.kopf` field.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.consistency_timeout = config.consistency_timeout
    # Each watch ends after this long and kopf lists again, which re-fires the child event handlers for
    # every trainer Job and server Deployment: a periodic resync that heals any missed event. (No
    # per-object timer: kopf would put a finalizer on every FineTuneJob to stop it.)
    settings.watching.server_timeout = config.watch_server_timeout
    # Server-side label selectors: on a shared cluster the operator must not stream every pod (or every
    # Deployment) of every team only to drop all but its own; the handlers' label filters stay too.
    for resource, labels in WATCHED_CHILDREN.items():
        settings.watching.label_selectors[resource] = ",".join(f"{k}={v}" for k, v in labels.items())
    settings.queueing.idle_timeout = config.worker_idle_timeout
    settings.posting.enabled = config.post_events
    settings.posting.reporting_component = naming.MANAGER
    settings.posting.level = logging.WARNING  # our own Events mark each transition; skip kopf's chatter
    init_series()
    api = k8s.Api(cluster)
    memo.reconciler = Reconciler(api, config, PhaseCounts())
    memo.metrics_runner = None
    if config.metrics_port is not None:
        memo.metrics_runner = await start_server(config.metrics_host, config.metrics_port)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("metrics_runner") is not None:
        await memo.metrics_runner.cleanup()
    if memo.get("reconciler") is not None:
        await memo.reconciler.api.close()


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf talks to the same cluster, with the same credentials, as our own client."""
    cluster: k8s.Cluster = memo.get("cluster") or k8s.Cluster.discover()
    return kopf.ConnectionInfo(
        server=cluster.server,
        token=cluster.bearer(),
        scheme="Bearer" if cluster.bearer() else None,
        ca_path=cluster.ca_file,
        certificate_path=cluster.cert_file,
        private_key_path=cluster.key_file,
        insecure=cluster.insecure or None,
    )


async def _reconcile(
    memo: kopf.Memo, handler: str, namespace: str, name: str, seen_pods: tuple[dict[str, Any], ...] = ()
) -> None:
    reconciler: Reconciler = memo.reconciler
    try:
        with timed(handler, expected=(SpecError,)):  # a bad spec is the user's error, not ours
            wait = await reconciler.reconcile(namespace, name, seen_pods)
    except SpecError as err:
        raise kopf.PermanentError(str(err)) from None  # the status already says what to fix
    except k8s.ApiError as err:
        raise kopf.TemporaryError(str(err), delay=reconciler.config.retry_delay) from err
    if isinstance(wait, Wait):
        raise kopf.TemporaryError(wait.reason, delay=wait.delay)


@kopf.on.resume(*FTJ)
@kopf.on.create(*FTJ)
@kopf.on.update(*FTJ)
async def finetunejob_changed(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A FineTuneJob appeared, changed, or was there when the operator started."""
    await _reconcile(memo, "finetunejob", namespace or "", name)


@kopf.on.delete(*FTJ, optional=True)
async def finetunejob_deleted(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Children go with their owner (ownerReferences); only the operator's own memory is left to drop."""
    memo.reconciler.forget(namespace or "", name)


async def _child_changed(
    memo: kopf.Memo,
    handler: str,
    namespace: str | None,
    labels: Mapping[str, str],
    seen_pods: tuple[dict[str, Any], ...] = (),
) -> None:
    owner = labels.get(naming.LABEL_INSTANCE)
    if not owner or not namespace:
        return
    try:
        await _reconcile(memo, handler, namespace, owner, seen_pods)
    except (kopf.PermanentError, kopf.TemporaryError) as err:
        # The FineTuneJob's own handlers retry; an event on a child only nudges.
        log.debug("reconcile of %s/%s after a %s event: %s", namespace, owner, handler, err)


@kopf.on.event("jobset.x-k8s.io", "v1alpha2", "jobsets", labels=TRAINER_CHILD)
async def trainer_jobset_event(namespace: str | None, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    """The JobSet controller (or Kueue) changed a trainer JobSet: follow it."""
    await _child_changed(memo, "trainer-jobset", namespace, labels)


@kopf.on.event("", "v1", "pods", labels=TRAINER_CHILD)
async def trainer_pod_event(
    namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    """A trainer pod was scheduled, started, failed or deleted: diagnose the run while the pod exists."""
    await _child_changed(memo, "trainer-pod", namespace, labels, (dict(body),))


@kopf.on.event("apps", "v1", "deployments", labels=SERVER_CHILD)
async def server_deployment_event(
    namespace: str | None, labels: Mapping[str, str], memo: kopf.Memo, **_: Any
) -> None:
    """The server Deployment rolled forward: Deploying becomes Serving when the new model is up."""
    await _child_changed(memo, "server-deployment", namespace, labels)
