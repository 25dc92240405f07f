"""``locoswarm export``: one model file out of a swarm.

The outer weights (phi) of up to ``--max-peers`` live nodes, fetched with ``FetchState``, and of
the newest checkpoint in each ``--from-checkpoint`` folder, averaged once (one merge of the
local-SGD replicas at the end, as "A Single Merging Suffices" recommends) and written as a
safetensors file under the model's own parameter names. The model comes from the same task
flags the nodes run with (``--task``, ``--seed``, ``--config``...), and every source must carry
that configuration's model fingerprint. It prints each source's validation loss and the merged
model's, and writes them into the file's metadata. For ``--task hf`` it also writes the merged
model and its tokenizer with ``save_pretrained`` (``--hf-dir``), loadable with
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from locoswarm.errors import CheckpointError, ConfigError, PeerError
from locoswarm.node import checkpoint
from locoswarm.node.config import NodeConfig
from locoswarm.node.outer import fingerprint
from locoswarm.protocol import LocalView, PeerClient, Received
from locoswarm.tasks import hf
from locoswarm.tasks.inner import flat_params, set_flat
from locoswarm.tasks.task import ReplicaTask, TaskFactory

log = logging.getLogger("locoswarm.node")


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    phi: Tensor
    outer_step: int


def build_model(config: NodeConfig) -> tuple[ReplicaTask, str]:
    """The task's model (initial weights, as every node builds it) and its fingerprint."""
    torch.manual_seed(config.trainer.seed)
    task = TaskFactory(config.task).build(replica=0, num_replicas=1, seed=0)
    shapes = [tuple(p.shape) for p in task.model.parameters()]
    return task, fingerprint(config, shapes)


def phi_of(received: Received, numel: int, where: str) -> Tensor:
    """The outer weights in a FetchState payload (its first tensor, fp32)."""
    spec = received.header.tensors[0] if received.header.tensors else None
    if spec is None or spec.name != "phi" or spec.codec != "fp32" or spec.num_bytes != 4 * numel:
        raise PeerError(where, f"its state holds no fp32 phi of {numel} elements")
    view = memoryview(received.payload)[: spec.num_bytes]
    return torch.frombuffer(bytearray(view), dtype=torch.float32)


async def from_peers(
    config: NodeConfig, addresses: list[str], fp: str, numel: int, secret: bytes | None
) -> list[Source]:
    """phi of each node at ``addresses`` that answers (a node that does not is skipped, said)."""
    from locoswarm.node.daemon import _protocol_config

    protocol = _protocol_config(config.protocol, secret)
    view = LocalView(run_id=config.run_id, model_fingerprint=fp)
    out = []
    async with PeerClient(protocol, peer_id="locoswarm-export") as client:
        for address in addresses:
            try:
                status = await client.status(address)
                if status.model_fingerprint != fp:
                    raise PeerError(
                        address, f"it trains model {status.model_fingerprint}, not {fp}"
                    )
                got = await client.fetch_state(address, view=view, target=status.peer_id)
                phi = await asyncio.to_thread(phi_of, got, numel, address)
            except PeerError as exc:
                log.warning("export: skipped %s: %s", address, exc)
                continue
            out.append(Source(f"{address} ({status.peer_id})", phi, got.header.outer_step))
    return out


def from_checkpoint(directory: Path, fp: str, numel: int) -> Source:
    found = checkpoint.load_latest(directory)
    if found is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    path, state = found
    if state.get("fingerprint") != fp:
        raise ConfigError(
            f"{path} is for model fingerprint {state.get('fingerprint')}; these flags build {fp}"
        )
    phi = state["outer"]["state"]["phi"]
    if not isinstance(phi, Tensor) or phi.numel() != numel:
        raise CheckpointError(f"{path} holds no phi of {numel} elements")
    return Source(str(path), phi.float(), int(state["outer_step"]))


def merge(sources: list[Source]) -> Tensor:
    """The mean of the sources' phi (summed in float64, in the order given)."""
    total = torch.zeros_like(sources[0].phi, dtype=torch.float64)
    for source in sources:
        total += source.phi.double()
    return (total / len(sources)).float()


def write(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """The model's weights as safetensors (tied weights stored once, as safetensors requires)."""
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path), metadata=metadata)


def export(
    config: NodeConfig,
    *,
    peers: list[str],
    checkpoints: list[Path],
    out: Path,
    max_peers: int,
    secret: bytes | None = None,
    hf_dir: Path | None = None,
) -> dict[str, Any]:
    """Merge the sources and write ``out`` (and, for an hf task, the ``save_pretrained`` folder
    ``hf_dir``, by default `default_hf_dir`); returns what it printed (losses per source)."""
    is_hf = config.task.name == hf.HF_TASK
    if hf_dir is not None and not is_hf:
        raise ConfigError(f"export: --hf-dir applies to --task {hf.HF_TASK} only")
    task, fp = build_model(config)
    numel = flat_params(task.model).numel()
    sources = [from_checkpoint(d, fp, numel) for d in checkpoints]
    if peers:
        sources += asyncio.run(from_peers(config, peers[:max_peers], fp, numel, secret))
    if not sources:
        raise PeerError(None, "no source answered: nothing to export")
    losses = {}
    for source in sources:
        set_flat(task.model, source.phi)
        losses[source.name] = task.validation_loss(task.model)
    merged = merge(sources)
    set_flat(task.model, merged)
    loss = task.validation_loss(task.model)
    report = {
        "out": str(out),
        "fingerprint": fp,
        "task": config.task.name,
        "sources": {
            s.name: {"outer_step": s.outer_step, "val_loss": losses[s.name]} for s in sources
        },
        "val_loss": loss,
        "mean_source_val_loss": sum(losses.values()) / len(losses),
    }
    hf_out = (hf_dir or default_hf_dir(out)) if is_hf else None
    if hf_out is not None:
        report["hf_dir"] = str(hf_out)
    write(task.model, out, {"locoswarm": json.dumps(report)})
    if hf_out is not None:
        hf.save_pretrained(task.model, config.task.tokenizer or config.task.model, hf_out)
    return report


def default_hf_dir(out: Path) -> Path:
    """Where an hf task's ``save_pretrained`` folder goes without ``--hf-dir``: beside ``out``,
    named after it (``merged.safetensors`` -> ``merged-hf``)."""
    return out.parent / f"{out.stem}-hf"


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from locoswarm.node.run import add_run_arguments

    add_run_arguments(p)  # the nodes' own task flags build the same model
    p.add_argument(
        "--from-peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a live node's gRPC address to fetch the outer weights from (repeatable)",
    )
    p.add_argument(
        "--from-checkpoint",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a checkpoint folder: its newest checkpoint's outer weights (repeatable)",
    )
    p.add_argument("--max-peers", type=int, default=8, help="fetch from at most this many peers")
    p.add_argument("--out", type=Path, required=True, help="the safetensors file to write")
    p.add_argument(
        "--hf-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="--task hf: the folder for the merged model and its tokenizer, written with "
        "save_pretrained (loads with AutoModelForCausalLM.from_pretrained); default: beside "
        "--out, named after it with -hf (merged.safetensors -> merged-hf)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(a: argparse.Namespace) -> int:
    from locoswarm.node.daemon import _read_secret
    from locoswarm.node.run import config_from_args

    if not a.from_peer and not a.from_checkpoint:
        raise ConfigError("export: give --from-peer HOST:PORT or --from-checkpoint DIR")
    if a.max_peers < 1:
        raise ConfigError("export: --max-peers must be >= 1")
    config = config_from_args(a)
    report = export(
        config,
        peers=list(a.from_peer),
        checkpoints=list(a.from_checkpoint),
        out=a.out,
        max_peers=a.max_peers,
        secret=_read_secret(config.secret_file),
        hf_dir=a.hf_dir,
    )
    for name, info in report["sources"].items():
        print(f"{name}: round {info['outer_step']}, validation loss {info['val_loss']:.4f}")
    loss = report["val_loss"]
    print(
        f"wrote {report['out']}: {len(report['sources'])} model(s) merged, validation loss "
        f"{loss:.4f} (the sources' mean {report['mean_source_val_loss']:.4f})"
        if not math.isnan(loss)
        else f"wrote {report['out']}: {len(report['sources'])} model(s) merged"
    )
    if "hf_dir" in report:
        print(f"wrote {report['hf_dir']}: the merged model and its tokenizer (save_pretrained)")
    print(json.dumps(report))
    return 0
