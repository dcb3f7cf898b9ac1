"""End to end on a real cluster: the chart's operator takes a FineTuneJob from `kubectl apply` to a model
that answers predictions, with the chart's RBAC enforced by a real API server.

Skipped (with the reason) unless KUBECONFIG reaches a kind cluster; see conftest.py for how to run it.
The trainer runs on the CPU: a 2-layer BERT and a WordPiece tokenizer made in the cluster by a seed pod,
and a small synthetic sentiment data set.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

IMAGE = os.environ.get("FINETUNE_E2E_IMAGE", "finetune:e2e")
OPERATOR_NAMESPACE = os.environ.get("FINETUNE_E2E_OPERATOR_NAMESPACE", "finetune-system")
Kubectl = Any  # conftest.Kubectl (test folders are not packages)

pytestmark = pytest.mark.timeout(1200)

# Runs in the finetune image: writes a tiny base model and a data set into the claim at /workspace.
SEED = r"""
import csv, random, pathlib, torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
root = pathlib.Path("/workspace")
rng = random.Random(0)
good, bad = ["good", "great", "superb", "lovely"], ["bad", "awful", "dull", "boring"]
filler = ["the", "film", "is", "a", "story", "with", "actors", "and", "plot", "very"]
rows = []
for _ in range(600):
    positive = rng.random() < 0.5
    words = rng.choices(filler, k=rng.randint(3, 10))
    words.insert(rng.randrange(len(words) + 1), rng.choice(good if positive else bad))
    rows.append((" ".join(words), "positive" if positive else "negative"))
(root / "data").mkdir(parents=True, exist_ok=True)
with open(root / "data" / "train.tsv", "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
    w.writerow(["sentence", "label"])
    w.writerows(rows)
raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
raw.normalizer = normalizers.BertNormalizer(lowercase=True)
raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
raw.train_from_iterator([r[0] for r in rows], trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
raw.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", special_tokens=[("[CLS]", raw.token_to_id("[CLS]")), ("[SEP]", raw.token_to_id("[SEP]"))])
tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                              sep_token="[SEP]", mask_token="[MASK]", model_max_length=32)
torch.manual_seed(0)
config = BertConfig(vocab_size=raw.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, num_labels=2)
BertForSequenceClassification(config).save_pretrained(root / "base-model")
tok.save_pretrained(root / "base-model")
print("seeded", len(rows), "rows")
"""


def ftj(name: str, namespace: str, claim: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "text-classification",
        "model": {"path": "/workspace/base-model"},
        "dataset": {"train": {"path": "/workspace/data/train.tsv"}, "textColumn": "sentence",
                    "labelColumn": "label"},
        "training": {"epochs": 3, "batchSize": 16, "learningRate": 0.003, "maxLength": 32, "warmupRatio": 0.0},
        "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "1", "memory": "2Gi", "shmSize": "256Mi"},
        "storage": {"claimName": claim},
        "promotion": {"minValue": 0.6},
        "serving": {"enabled": True, "replicas": 1, "cpu": "200m", "memory": "1Gi"},
        "image": IMAGE,
        **spec,
    }
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def status(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return kubectl.json("get", "finetunejob", name, "-n", namespace).get("status") or {}


def test_crd_is_established(kubectl: Kubectl) -> None:
    crd = kubectl.json("get", "crd", "finetunejobs.finetune.dev")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]


def test_operator_runs_hardened(kubectl: Kubectl) -> None:
    deployment = kubectl.json("get", "deployment", "finetune-operator", "-n", OPERATOR_NAMESPACE)
    assert deployment["status"].get("availableReplicas") == 1
    pods = kubectl.json("get", "pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/component=operator")
    (pod,) = pods["items"]
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0, "the operator crashed and restarted"


def test_api_server_rejects_an_invalid_spec(kubectl: Kubectl, namespace: str) -> None:
    bad = ftj("bad-task", namespace, "data", task="translation")
    proc = kubectl.apply(bad, check=False)
    assert proc.returncode != 0
    assert "spec.task" in proc.stderr and "Unsupported value" in proc.stderr


def test_missing_volume_is_reported_in_the_status(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(ftj("no-volume", namespace, "missing-claim"))
    found = kubectl.wait_for(
        "phase Pending with the missing claim",
        lambda: (s := status(kubectl, namespace, "no-volume")).get("phase") == "Pending" and s, 120,
    )
    assert "missing-claim" in found["message"] and "not found" in found["message"]
    table = kubectl.run("get", "ftj", "-n", namespace).stdout
    assert "no-volume" in table and "Pending" in table


def test_fine_tune_gate_and_serve(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data", "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    })
    seed = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "seed", "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "seed", "image": IMAGE, "imagePullPolicy": "Never",
                "command": ["python", "-c", SEED],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}],
            }],
            "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": "data"}}],
        },
    }
    kubectl.apply(seed)
    kubectl.wait_for("the seed pod", lambda: kubectl.json("get", "pod", "seed", "-n", namespace)["status"]
                     .get("phase") in ("Succeeded", "Failed"), 600, interval=5)
    assert kubectl.json("get", "pod", "seed", "-n", namespace)["status"]["phase"] == "Succeeded", (
        kubectl.run("logs", "seed", "-n", namespace, check=False).stdout
    )

    # Two trainer pods on CPUs: one gloo world through the JobSet's headless Service (kind runs one node,
    # so the ReadWriteOnce claim can be shared by both).
    kubectl.apply(ftj("sentiment", namespace, "data", resources={
        "nodes": 2, "gpusPerNode": 0, "cpu": "1", "memory": "2Gi", "shmSize": "256Mi"}))
    final = kubectl.wait_for(
        "phase Serving",
        lambda: (s := status(kubectl, namespace, "sentiment")).get("phase") in ("Serving", "Failed", "Rejected") and s,
        900, interval=5,
    )
    assert final["phase"] == "Serving", json.dumps(final, indent=2)
    assert final["metrics"]["f1"] >= 0.6
    assert final["trainer"]["restarts"] == 0 and final["trainer"]["jobSetName"] == "sentiment-train-1"
    events = kubectl.run("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=sentiment",
                         "-o", "jsonpath={.items[*].message}").stdout
    assert "finished on 2 process(es)" in events, events

    # Bad data: the trainer's exit code 2 reaches the JobSet, which fails at once with no restart.
    kubectl.apply(ftj("bad-data", namespace, "data", dataset={
        "train": {"path": "/workspace/data/train.tsv"}, "textColumn": "sentence", "labelColumn": "nope"}))
    failed = kubectl.wait_for(
        "phase Failed",
        lambda: (s := status(kubectl, namespace, "bad-data")).get("phase") in ("Failed", "Serving") and s,
        600, interval=5,
    )
    assert failed["phase"] == "Failed" and failed["reason"] == "PermanentError", json.dumps(failed, indent=2)
    assert "'nope' not found" in failed["message"] and failed["trainer"]["restarts"] == 0
    assert final["endpoint"].startswith("http://sentiment-server.")

    # Through the API server's service proxy: no port-forward, no extra pod.
    body = json.dumps({"instances": ["a great and lovely film", "a dull and boring story"]})
    path = f"/api/v1/namespaces/{namespace}/services/sentiment-server:http/proxy/v1/models/sentiment:predict"
    answer = json.loads(kubectl.run("create", "--raw", path, "-f", "-", stdin=body).stdout)
    labels = [p["label"] if isinstance(p, dict) else p for p in answer["predictions"]]
    assert labels == ["positive", "negative"], answer
