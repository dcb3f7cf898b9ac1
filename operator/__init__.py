"""finetune.operator: the kopf operator behind `finetune operator`.

main (kopf registrations) -> reconcile (one level-triggered pass) -> builders/serving (pure manifests),
gate (the quality gate), observe (reading Job, pod and Deployment state), phases (status patches),
k8s (API I/O), metrics (/metrics), cli (the sub-command), testing (kmock emulator helpers for tests).
"""
