"""OpenVINO inference for a loaded SentenceTransformer or CrossEncoder: bf16 and NNCF int8.

PyTorch's bf16 and dynamic int8 leave most of a small encoder's time in framework overhead on a
2-core CPU; OpenVINO compiles the whole network into fused CPU kernels. The model's inner
transformers network (what sentence-transformers' ``Transformer`` module calls) is converted
with ``openvino.convert_model`` and compiled for the CPU; a small torch module then takes
its place inside the ``Transformer`` module and returns what that module reads from it
(``last_hidden_state`` for an embedder, ``logits`` for a cross-encoder) as float32 torch
tensors, so tokenization, pooling, normalization and every caller stay sentence-transformers'.

- ``openvino-bf16``: the fp32 network compiled with bf16 inference precision (native bf16
  matrix units where the CPU has them; f32 elsewhere).
- ``openvino-int8``: NNCF post-training quantization (``nncf.quantize``, transformer preset:
  int8 weights and activations, ranges from calibration inputs), non-quantized parts as above.
  Calibration is deterministic: the caller's texts (an even sample of up to
  ``CALIBRATION_MAX_TEXTS``, in the order given) or :data:`DEFAULT_CALIBRATION_TEXTS`; a
  cross-encoder is calibrated on pairs (the text's first sentence as the query, the text).

sentence-transformers' own ``backend="openvino"`` needs optimum-intel 2, which does not install
beside the transformers this project uses; openvino and nncf are the libraries that do the work.

OpenVINO's converter and NNCF send usage telemetry (each event forks a process, which LanceDB
warns about in a process that uses it) unless the machine has opted out, once, with the
openvino-telemetry package's ``opt_in_out --opt_out``; they skip it where ``CI=true``.

A cross-encoder's network is compiled per padded input shape (``StaticShapes``): OpenVINO's CPU
kernels run a static shape faster than a dynamic one, and a reranker sees one shape on nearly
every query (its depth of candidates at its ``max_length``). An embedder's shapes vary with every
batch of queries, so it keeps the one dynamic network.

With a ``cache_dir``, the converted (and quantized) network is saved as OpenVINO IR under a key
of the weights' fingerprint, the precision, the calibration's fingerprint, the sequence length
and the library versions, and read back next time instead of converting again. It is saved as
converted (float weights not compressed to fp16), so a network read back computes exactly what
the converted one did; the ``CACHE_KEPT`` most recently used networks stay, older ones are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Sequence

PRECISIONS = ("openvino-bf16", "openvino-int8")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
CALIBRATION_MAX_TEXTS = 200  # up to 25 NNCF calibration batches of 8
CALIBRATION_BATCH = 8
CONVERSIONS: Counter = Counter()  # (precision, "convert" | "quantize" | "cache-hit" | "memory-hit") -> count, per process
CONVERTED_IN_MEMORY = 8  # networks converted in this process, kept for the next load of the same weights
SEQ_BUCKET = 32  # StaticShapes pads a batch's sequence length up to a multiple of this many tokens
STATIC_SHAPES_KEPT = 8  # compiled shapes StaticShapes keeps (least recently used dropped first)
_CONVERTED: OrderedDict = OrderedDict()  # cache key -> openvino.Model
CACHE_KEPT = 16  # networks kept in a cache folder (about four weeks of a pipeline's models)

DEFAULT_CALIBRATION_TEXTS = (
    # Used when the caller has no corpus at hand: short passages from several domains, so that
    # activation ranges are not fitted to one vocabulary. Written for this project.
    "Vitamin D is made in the skin under sunlight and helps the body absorb calcium from food.",
    "Statins lower LDL cholesterol by blocking an enzyme the liver uses to make it.",
    "The ribosome reads messenger RNA three bases at a time and joins the matching amino acids into a chain.",
    "Insulin resistance means muscle, fat and liver cells respond poorly to insulin, so blood sugar stays high.",
    "A randomized controlled trial assigns participants to treatment or control by chance to remove selection bias.",
    "Antibiotics do not work against viruses; overusing them breeds resistant bacteria.",
    "CRISPR-Cas9 cuts DNA at a site chosen by a short guide RNA, letting researchers edit genes.",
    "Chronic inflammation is linked to heart disease, type 2 diabetes and some cancers.",
    "To reset your password, open Settings, choose Security, and follow the link sent to your email.",
    "The invoice is due within 30 days; late payments incur a fee of 1.5% per month.",
    "Our API returns HTTP 429 when you exceed the rate limit; retry after the number of seconds in Retry-After.",
    "Install the package with pip, then import it and call connect() with the path to your database.",
    "The function raises ValueError if the input list is empty or contains a negative number.",
    "Kubernetes restarts a container whose liveness probe fails three times in a row.",
    "A hash index answers equality lookups quickly but cannot serve range queries.",
    "Use a virtual environment so each project's dependencies stay separate.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War and reshaped the map of Europe.",
    "Photosynthesis converts light energy, water and carbon dioxide into glucose and oxygen.",
    "The Amazon rainforest produces a large share of the world's river water flowing into the Atlantic.",
    "Interest rates rose as the central bank tried to bring inflation back toward its two percent target.",
    "The recipe calls for two cups of flour, a teaspoon of salt, and butter cut into small cubes.",
    "Shipping is free on orders over fifty dollars; returns are accepted within 30 days with a receipt.",
    "The striker scored twice in the second half, and the team moved up to third place in the league.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "how does vitamin d affect bone density",
    "what is the rate limit of the api",
    "side effects of statins in older adults",
    "when did the thirty years war end",
    "Employees accrue 1.5 days of paid leave per month; unused days carry over up to a maximum of ten.",
    "The contract may be terminated by either party with sixty days' written notice.",
    "Black holes form when massive stars collapse at the end of their lives, leaving a region light cannot escape.",
    "Regular exercise improves insulin sensitivity, lowers blood pressure and reduces the risk of depression.",
)


class StaticShapes:
    """The network compiled once per padded input shape, for a model whose shapes repeat.

    A batch of ``(rows, tokens)`` is padded with masked tokens up to ``tokens`` rounded up to
    :data:`SEQ_BUCKET` (at most the model's position limit); the network compiled for that
    static shape runs it, and the output is cut back to the batch's own tokens. Masked padding
    changes no real token's output (attention never reads it), so the result depends on the
    batch alone, not on which shapes came before. Compiling a shape takes about as long as
    compiling the dynamic network, once per shape; the last :data:`STATIC_SHAPES_KEPT` are kept.
    """

    def __init__(self, ov_model, compile_config: dict, max_positions: int | None = None):
        self.ov_model, self.compile_config, self.max_positions = ov_model, dict(compile_config), max_positions
        self.compiled: OrderedDict = OrderedDict()  # (rows, padded tokens) -> compiled network
        self.compilations = 0

    def padded_length(self, tokens: int) -> int:
        padded = -(-tokens // SEQ_BUCKET) * SEQ_BUCKET
        if self.max_positions:
            padded = min(padded, self.max_positions)
        return max(tokens, padded)

    def __call__(self, feed: dict):
        import numpy as np
        import openvino as ov

        rows, tokens = next(iter(feed.values())).shape
        shape = (rows, self.padded_length(tokens))
        compiled = self.compiled.get(shape)
        if compiled is None:
            model = self.ov_model.clone()
            model.reshape({name: list(shape) for name in feed})
            compiled = self.compiled[shape] = ov.Core().compile_model(model, "CPU", self.compile_config)
            self.compilations += 1
            while len(self.compiled) > STATIC_SHAPES_KEPT:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(shape)
        pad = shape[1] - tokens
        out = compiled({k: np.pad(v, ((0, 0), (0, pad))) if pad else v for k, v in feed.items()})[0]
        return (out[:, :tokens] if pad and out.ndim >= 3 else out,)  # indexed like a compiled network's outputs


def _wrapper_class():
    """The torch module class that runs a compiled network (built here: torch is imported lazily)."""
    import numpy as np
    import torch

    class _OpenVINOModel(torch.nn.Module):
        """Stands in for a transformers model inside sentence-transformers' ``Transformer`` module."""

        def __init__(self, compiled, config, output_name: str, input_names: Sequence[str], weights_mb: float):
            """``compiled``: the compiled dynamic network, or a ``StaticShapes`` (both map a feed to outputs)."""
            super().__init__()
            self.compiled, self.config, self.output_name = compiled, config, output_name
            self.input_names, self.weights_mb = tuple(input_names), weights_mb
            self.device = torch.device("cpu")

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **_bookkeeping):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            feed = {}
            for name in self.input_names:
                value = given[name] if given[name] is not None else torch.zeros_like(input_ids)
                feed[name] = value.cpu().numpy()
            out = self.compiled(feed)[0]
            return {self.output_name: torch.from_numpy(np.array(out, dtype=np.float32))}

    return _OpenVINOModel


def transformer_modules(model) -> list:
    """Every sentence-transformers ``Transformer`` module of a SentenceTransformer or CrossEncoder:
    one, or one per route of a query/document ``Router`` model (the corpus loss's)."""
    from sentence_transformers.base.modules.transformer import Transformer

    modules = [m for m in model.modules() if isinstance(m, Transformer)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no transformers module to run on OpenVINO")
    for module in modules:
        spec = module.modality_config.get("text", {})
        if spec.get("method") != "forward" or not isinstance(spec.get("method_output_name"), str):
            raise ValueError(f"OpenVINO runs text models whose forward returns one output, not {spec}")
    return modules


def weights_fingerprint(module) -> str:
    """Hash of every tensor in the torch module's state dict (names, dtypes, shapes and bytes)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def calibration_inputs(model, texts: Sequence[str] | None, pairs: bool) -> list[dict]:
    """Tokenized calibration batches, exactly as the model (or one ``Transformer`` module of it)
    tokenizes at inference."""
    texts = [t for t in (texts if texts is not None else DEFAULT_CALIBRATION_TEXTS) if t and t.strip()]
    if not texts:
        raise ValueError("openvino-int8 needs calibration texts; none were given (all empty)")
    step = max(1, len(texts) // CALIBRATION_MAX_TEXTS)
    texts = texts[::step][:CALIBRATION_MAX_TEXTS]
    items = [(first_sentence(t), t) for t in texts] if pairs else texts
    batches = []
    for i in range(0, len(items), CALIBRATION_BATCH):
        features = model.preprocess(items[i:i + CALIBRATION_BATCH])
        batches.append({k: features[k].numpy() for k in INPUT_NAMES if k in features})
    return batches


def first_sentence(text: str) -> str:
    """A query-like stand-in for calibration pairs: the text up to its first sentence end (<= 20 words)."""
    for end in (". ", "? ", "! "):
        if end in text:
            text = text.split(end, 1)[0]
            break
    return " ".join(text.split()[:20])


def cache_key(weights: str, precision: str, calibration: list[dict] | None, seq: int, output: str) -> str:
    import nncf
    import openvino as ov

    h = hashlib.sha256(f"{weights}|{precision}|{seq}|{output}|{ov.__version__}|{nncf.__version__}".encode())
    for batch in calibration or ():
        for name in sorted(batch):
            h.update(name.encode())
            h.update(batch[name].tobytes())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _quiet_conversion():
    """No tracer warnings, NNCF log lines or NNCF's rich progress bars on the terminal."""
    import rich

    console = rich.get_console()
    quiet, level = console.quiet, logging.getLogger("nncf").level
    console.quiet = True
    logging.getLogger("nncf").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        console.quiet = quiet
        logging.getLogger("nncf").setLevel(level)


def convert(module, precision: str, calibration: list[dict] | None):
    """The ``Transformer`` module's network as an ``openvino.Model`` (NNCF-quantized for int8)."""
    import openvino as ov
    import torch

    output = module.modality_config["text"]["method_output_name"]
    example = calibration[0] if calibration else {
        k: v.numpy() for k, v in module.preprocess(list(DEFAULT_CALIBRATION_TEXTS[:2])).items() if k in INPUT_NAMES}
    names = [k for k in INPUT_NAMES if k in example]
    hf = module.model

    class Traced(torch.nn.Module):  # the transformers model returning one tensor, for the tracer
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            return self.hf(**kw)[output]

    with _quiet_conversion(), torch.no_grad():
        ov_model = ov.convert_model(Traced().eval(), example_input={k: torch.from_numpy(example[k]) for k in names})
        CONVERSIONS[(precision, "convert")] += 1
        if precision == "openvino-int8":
            import nncf

            ov_model = nncf.quantize(ov_model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                     subset_size=len(calibration))
            CONVERSIONS[(precision, "quantize")] += 1
    return ov_model


def ir_weights_mb(ov_model) -> float:
    """Megabytes of the network's constants as saved (``save_model`` stores float weights as fp16)."""
    import openvino as ov

    total = 0
    for op in ov_model.get_ops():
        if op.get_type_name() == "Constant":
            size = op.get_byte_size()
            total += size // 2 if op.get_output_element_type(0) == ov.Type.f32 else size
    return total / 1e6


def load_or_convert(module, precision: str, calibration, cache_dir: Path | None):
    """The ``openvino.Model`` of one ``Transformer`` module: one converted earlier in this process
    (a weekly report loads the same model several times; a Router's document route is its base's
    network), else read from ``cache_dir`` when saved there, else converted (and saved)."""
    key = cache_key(weights_fingerprint(module.model), precision, calibration, int(module.max_seq_length or 0),
                    module.modality_config["text"]["method_output_name"])
    if key in _CONVERTED:
        _CONVERTED.move_to_end(key)
        CONVERSIONS[(precision, "memory-hit")] += 1
        return _CONVERTED[key]
    ov_model = _read_or_convert(module, precision, calibration, cache_dir, key)
    _CONVERTED[key] = ov_model
    while len(_CONVERTED) > CONVERTED_IN_MEMORY:
        _CONVERTED.popitem(last=False)
    return ov_model


def _read_or_convert(module, precision: str, calibration, cache_dir: Path | None, key: str):
    import openvino as ov

    if cache_dir is None:
        return convert(module, precision, calibration)
    xml = Path(cache_dir) / f"{precision}-{key}" / "model.xml"
    if xml.exists():
        CONVERSIONS[(precision, "cache-hit")] += 1
        with contextlib.suppress(OSError):
            os.utime(xml.parent)  # used now: the last to be removed
        return ov.Core().read_model(xml)
    ov_model = convert(module, precision, calibration)
    tmp = xml.parent.with_name(xml.parent.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, tmp / "model.xml", compress_to_fp16=False)  # as converted: a hit computes the same
    try:
        tmp.rename(xml.parent)  # atomic: a concurrent reader sees a whole IR or none
    except OSError:  # another process saved the same key first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    prune_cache(Path(cache_dir), CACHE_KEPT)
    return ov_model


def prune_cache(cache_dir: Path, keep: int) -> list[str]:
    """Remove all but the ``keep`` most recently used networks saved in ``cache_dir``; their names."""
    saved = [p for p in cache_dir.iterdir() if ".tmp" not in p.name and (p / "model.xml").exists()]
    saved.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in saved[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return [p.name for p in saved[keep:]]


def run_on_openvino(model, precision: str, *, bf16: bool, threads: int,
                    calibration_texts: Sequence[str] | None = None, cache_dir: str | Path | None = None,
                    modules: Sequence | None = None):
    """Swap each of the model's transformers networks (one per Router route; or only ``modules``,
    some of them) for its compiled OpenVINO version, in place; each route is calibrated with its
    own tokenizer."""
    import openvino as ov
    from sentence_transformers.cross_encoder import CrossEncoder

    for module in transformer_modules(model) if modules is None else modules:
        calibration = None
        if precision == "openvino-int8":
            calibration = calibration_inputs(module, calibration_texts, pairs=isinstance(model, CrossEncoder))
        ov_model = load_or_convert(module, precision, calibration, Path(cache_dir) if cache_dir else None)
        names = [i.get_any_name() for i in ov_model.inputs]
        options = {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "INFERENCE_NUM_THREADS": max(1, threads),
            "PERFORMANCE_HINT": "LATENCY",
        }
        config, output = module.model.config, module.modality_config["text"]["method_output_name"]
        if isinstance(model, CrossEncoder):  # a reranker: (depth, max_length) on nearly every query
            compiled = StaticShapes(ov_model, options, getattr(config, "max_position_embeddings", None))
        else:
            compiled = ov.Core().compile_model(ov_model, "CPU", options)
        module.model = _wrapper_class()(compiled, config, output, names, ir_weights_mb(ov_model))
    return model
