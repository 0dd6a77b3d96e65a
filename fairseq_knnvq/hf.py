"""Export of fairseq wav2vec 2.0 checkpoints to Hugging Face ``transformers``.

A model pretrained with this plugin is a stock wav2vec 2.0 network: the KNN-to-vertex
term changes training only, and at evaluation the quantizer picks ``argmax`` codes as
``transformers``' ``Wav2Vec2GumbelVectorQuantizer`` does. So a checkpoint maps onto
``transformers`` classes weight for weight:

- a pretraining checkpoint (``model._name`` ``wav2vec2_knnvq`` or fairseq's
  ``wav2vec2``) becomes a ``Wav2Vec2ForPreTraining`` folder: its CNN, transformer,
  codebook (``quantizer.vars`` -> ``quantizer.codevectors``), code logits
  (``weight_proj``) and the two projections of the contrastive task;
- a CTC fine-tuned checkpoint (``wav2vec_ctc``) becomes a ``Wav2Vec2ForCTC`` folder with a
  ``Wav2Vec2Processor``: the tokenizer's vocabulary is the fine-tuning dictionary stored
  in the checkpoint (same indices, so the output layer is copied as is; fairseq's CTC
  blank ``<s>`` is called ``<pad>`` there, the name ``transformers`` gives the blank) and
  the feature extractor normalises the audio as the fairseq task did
  (``task.normalize``).

Both folders hold ``config.json`` and ``model.safetensors``, and the feature extractor's
settings (``preprocessor_config.json``; in the CTC folder inside the processor's files).
The weight names are mapped by :data:`ENCODER_RULES` / :data:`PRETRAINING_HEAD_RULES`;
every tensor of the checkpoint must be used and every parameter of the
``transformers`` model filled, with equal shapes, or the export fails before anything
is written. Settings that ``transformers``' ``Wav2Vec2`` classes cannot represent
(conformer layers, a deeper positional convolution or quantizer projection, quantized
encoder input, ...) are refused with their names.

``transformers`` is imported only here (``pip install 'fairseq-knnvq[hf]'``); the rest
of the plugin does not need it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .checkpoints import CheckpointError, load_model, read_checkpoint
from .files import atomic_folder
from .tasks.renamed_fields import rename_old_model_fields

PRETRAINING_MODELS = ("wav2vec2", "wav2vec2_knnvq")
CTC_MODELS = ("wav2vec_ctc",)
# fairseq's activation names that transformers' ACT2FN computes the same way.
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "tanh": "tanh", "linear": "linear"}
HF_EXTRA_HINT = "pip install 'fairseq-knnvq[hf]' (transformers and safetensors)"


class ExportError(Exception):
    """A checkpoint, option or output folder that the user has to change."""


# --- reading the checkpoint -----------------------------------------------------------


def checkpoint_kind(state: Mapping[str, Any], path: Path) -> str:
    """``"pretraining"`` or ``"ctc"``; ExportError naming the model for anything else."""
    model_name = state["cfg"].model.get("_name")
    if model_name in PRETRAINING_MODELS:
        return "pretraining"
    if model_name in CTC_MODELS:
        pretrained = state["cfg"].model.get("w2v_args")
        if pretrained is None:
            raise ExportError(
                f"checkpoint {path} is a CTC model without model.w2v_args (the pretrained model's "
                "config, which fairseq stores when it fine-tunes); the encoder's shape is unknown"
            )
        pretrained_name = pretrained.model.get("_name")
        if pretrained_name not in PRETRAINING_MODELS:
            raise ExportError(
                f"checkpoint {path} is a CTC model on top of a '{pretrained_name}' encoder; "
                f"knnvq-export-hf converts wav2vec 2.0 encoders ({', '.join(PRETRAINING_MODELS)})"
            )
        return "ctc"
    raise ExportError(
        f"checkpoint {path} holds a '{model_name}' model; knnvq-export-hf converts wav2vec 2.0 "
        f"pretraining checkpoints ({', '.join(PRETRAINING_MODELS)}) and CTC fine-tuned ones "
        f"({', '.join(CTC_MODELS)})"
    )


# --- the configuration ----------------------------------------------------------------


def parse_conv_layers(spec: str) -> List[Tuple[int, int, int]]:
    """fairseq's ``conv_feature_layers`` string, e.g. ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``,
    as ``(channels, kernel, stride)`` tuples. Only list/tuple/number literals, ``+`` and
    ``*`` are evaluated (fairseq itself calls ``eval``)."""

    def evaluate(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.List):
            return [evaluate(element) for element in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(evaluate(element) for element in node.elts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = evaluate(node.left), evaluate(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported expression {ast.dump(node)}")

    try:
        layers = evaluate(ast.parse(spec, mode="eval"))
        parsed = [(int(dim), int(kernel), int(stride)) for dim, kernel, stride in layers]
    except (SyntaxError, ValueError, TypeError) as error:
        raise ExportError(
            f"model.conv_feature_layers={spec!r} is not a list of (dim, kernel, stride) tuples: {error}"
        ) from None
    if not parsed:
        raise ExportError("model.conv_feature_layers is empty")
    return parsed


def unsupported_settings(w2v: Mapping[str, Any], pretraining: bool) -> List[str]:
    """Settings of the fairseq wav2vec 2.0 config that ``transformers``' Wav2Vec2 cannot
    represent, each as ``"model.<name>=<value> (<what transformers has>)"``."""
    problems = []

    def check(name: str, ok: Callable[[Any], bool], supported: str, default: Any = None) -> None:
        value = w2v.get(name, default)
        if not ok(value):
            problems.append(f"model.{name}={value!r} ({supported})")

    check("layer_type", lambda v: v == "transformer", "transformers has transformer layers only", "transformer")
    check("pos_conv_depth", lambda v: v == 1, "transformers has one positional convolution", 1)
    check("extractor_mode", lambda v: v in ("default", "layer_norm"), "default or layer_norm", "default")
    check("activation_fn", lambda v: v in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}", "gelu")
    check("quantize_input", lambda v: not v, "transformers quantizes the targets only", False)
    check("crop_seq_to_multiple", lambda v: v == 1, "transformers does not crop the features", 1)
    if pretraining:
        check("quantize_targets", bool, "a Wav2Vec2ForPreTraining needs the codebook of quantized targets", False)
        check("quantizer_depth", lambda v: v == 1, "transformers' quantizer has one linear layer", 1)
        check("target_glu", lambda v: not v, "transformers has no GLU on the targets", False)
        check("latent_groups", lambda v: v >= 1, "at least one group", 2)
    return problems


def hf_config_kwargs(w2v: Mapping[str, Any], finetuning: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``Wav2Vec2Config`` arguments for the fairseq wav2vec 2.0 model config ``w2v``.

    The training-time settings (dropouts, masking) come from the fine-tuning config
    when there is one (they are what a further fine-tuning in transformers would use)."""
    conv = parse_conv_layers(w2v.get("conv_feature_layers"))
    embed_dim = int(w2v["encoder_embed_dim"])
    final_dim = int(w2v.get("final_dim") or 0) or embed_dim
    latent_dim = int(w2v.get("latent_dim") or 0)
    training = finetuning if finetuning is not None else w2v

    def pick(name: str, fine_name: Optional[str] = None, default: Any = 0.0) -> Any:
        if finetuning is not None and fine_name is not None and finetuning.get(fine_name) is not None:
            return finetuning.get(fine_name)
        return w2v.get(name, default)

    kwargs: Dict[str, Any] = dict(
        hidden_size=embed_dim,
        num_hidden_layers=int(w2v["encoder_layers"]),
        num_attention_heads=int(w2v["encoder_attention_heads"]),
        intermediate_size=int(w2v["encoder_ffn_embed_dim"]),
        hidden_act=ACTIVATIONS[w2v.get("activation_fn", "gelu")],
        feat_extract_norm="layer" if w2v.get("extractor_mode", "default") == "layer_norm" else "group",
        feat_extract_activation="gelu",  # fairseq's ConvFeatureExtractionModel uses nn.GELU
        conv_dim=[dim for dim, _, _ in conv],
        conv_kernel=[kernel for _, kernel, _ in conv],
        conv_stride=[stride for _, _, stride in conv],
        conv_bias=bool(w2v.get("conv_bias", False)),
        num_conv_pos_embeddings=int(w2v.get("conv_pos", 128)),
        num_conv_pos_embedding_groups=int(w2v.get("conv_pos_groups", 16)),
        do_stable_layer_norm=bool(w2v.get("layer_norm_first", False)),
        layer_norm_eps=1e-5,  # fairseq's LayerNorm and GroupNorm default
        hidden_dropout=float(pick("dropout", "dropout", 0.1)),
        attention_dropout=float(pick("attention_dropout", "attention_dropout", 0.1)),
        activation_dropout=float(pick("activation_dropout", "activation_dropout", 0.0)),
        feat_proj_dropout=float(pick("dropout_input", "dropout_input", 0.0)),
        feat_quantizer_dropout=float(w2v.get("dropout_features", 0.0)),
        layerdrop=float(pick("encoder_layerdrop", "layerdrop", 0.0)),
        mask_time_prob=float(training.get("mask_prob", 0.65)),
        mask_time_length=int(training.get("mask_length", 10)),
        mask_feature_prob=float(training.get("mask_channel_prob", 0.0)),
        mask_feature_length=int(training.get("mask_channel_length", 10)),
        num_codevectors_per_group=int(w2v.get("latent_vars", 320)),
        num_codevector_groups=int(w2v.get("latent_groups", 2)),
        codevector_dim=latent_dim or final_dim,
        proj_codevector_dim=final_dim,
        contrastive_logits_temperature=float(w2v.get("logit_temp", 0.1)),
        num_negatives=int(w2v.get("num_negatives", 100)),
    )
    if finetuning is not None:
        kwargs["final_dropout"] = float(finetuning.get("final_dropout", 0.0))
    return kwargs


# --- the weights ------------------------------------------------------------------------

# fairseq name (regular expression, after the encoder prefix) -> transformers name
# (after "wav2vec2."). Conv layer i of the feature extractor is Sequential(conv, dropout,
# norm, GELU): the norm is a GroupNorm in "default" mode (layer 0 only) and
# Sequential(TransposeLast, LayerNorm, TransposeLast) in "layer_norm" mode.
ENCODER_RULES: Sequence[Tuple[str, str]] = (
    (r"mask_emb", r"masked_spec_embed"),
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.0\.weight_g", r"encoder.pos_conv_embed.conv.WEIGHT_G"),
    (r"encoder\.pos_conv\.0\.weight_v", r"encoder.pos_conv_embed.conv.WEIGHT_V"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
)
# Pretraining heads (fairseq name -> transformers name, both at the top level).
PRETRAINING_HEAD_RULES: Sequence[Tuple[str, str]] = (
    (r"quantizer\.vars", r"quantizer.codevectors"),
    (r"quantizer\.weight_proj\.(weight|bias)", r"quantizer.weight_proj.\1"),
    (r"project_q\.(weight|bias)", r"project_q.\1"),
    (r"final_proj\.(weight|bias)", r"project_hid.\1"),
)
CTC_HEAD_RULES: Sequence[Tuple[str, str]] = ((r"w2v_encoder\.proj\.(weight|bias)", r"lm_head.\1"),)


def _weight_norm_names(hf_keys: Sequence[str], base: str) -> Tuple[str, str]:
    """transformers keeps the positional convolution's weight norm as ``weight_g`` /
    ``weight_v`` (torch's old weight_norm) or as ``parametrizations.weight.original0`` /
    ``original1`` (the new one), depending on the torch it runs on."""
    if f"{base}.weight_g" in hf_keys:
        return f"{base}.weight_g", f"{base}.weight_v"
    return f"{base}.parametrizations.weight.original0", f"{base}.parametrizations.weight.original1"


def map_state_dict(
    fairseq_state: Mapping[str, torch.Tensor],
    hf_state: Mapping[str, torch.Tensor],
    encoder_prefix: str,
    head_rules: Sequence[Tuple[str, str]],
) -> Dict[str, torch.Tensor]:
    """The transformers state dict filled from ``fairseq_state``.

    Every fairseq tensor must map to a transformers parameter of the same shape, and
    every transformers parameter must be filled; an ExportError lists the exceptions.
    Two fairseq facts need care: without ``post_extract_proj`` (conv width equal to the
    encoder width) the transformers projection becomes the identity, and
    ``mask_emb`` is dropped where the transformers model has no masking embedding
    (fine-tuning configs without masking)."""
    hf_keys = list(hf_state)
    pos_conv = "wav2vec2.encoder.pos_conv_embed.conv"
    weight_g, weight_v = _weight_norm_names(hf_keys, pos_conv)
    rules = [
        (re.compile(re.escape(encoder_prefix) + pattern + "$"), "wav2vec2." + target)
        for pattern, target in ENCODER_RULES
    ]
    rules += [(re.compile(pattern + "$"), target) for pattern, target in head_rules]

    mapped: Dict[str, torch.Tensor] = {}
    unmapped, mismatched = [], []
    for name, tensor in fairseq_state.items():
        for pattern, target in rules:
            match = pattern.match(name)
            if match:
                hf_name = (
                    match.expand(target)
                    .replace(f"{pos_conv}.WEIGHT_G", weight_g)
                    .replace(f"{pos_conv}.WEIGHT_V", weight_v)
                )
                break
        else:
            unmapped.append(name)
            continue
        if hf_name == "wav2vec2.masked_spec_embed" and hf_name not in hf_state:
            continue
        if hf_name not in hf_state:
            unmapped.append(f"{name} (-> {hf_name})")
        elif tuple(hf_state[hf_name].shape) != tuple(tensor.shape):
            mismatched.append(f"{name} {tuple(tensor.shape)} -> {hf_name} {tuple(hf_state[hf_name].shape)}")
        else:
            mapped[hf_name] = tensor.detach().to(hf_state[hf_name].dtype).clone()

    projection = "wav2vec2.feature_projection.projection"
    if f"{projection}.weight" not in mapped and f"{projection}.weight" in hf_state:
        width = hf_state[f"{projection}.weight"].shape
        if width[0] == width[1]:
            mapped[f"{projection}.weight"] = torch.eye(width[0], dtype=hf_state[f"{projection}.weight"].dtype)
            mapped[f"{projection}.bias"] = torch.zeros(width[0], dtype=hf_state[f"{projection}.bias"].dtype)
    missing = [name for name in hf_keys if name not in mapped]
    if unmapped or mismatched or missing:
        details = []
        if unmapped:
            details.append(f"checkpoint tensors with no transformers counterpart: {', '.join(unmapped[:8])}")
        if mismatched:
            details.append(f"shapes that differ: {', '.join(mismatched[:8])}")
        if missing:
            details.append(f"transformers parameters not filled: {', '.join(missing[:8])}")
        raise ExportError("the checkpoint's weights do not map onto transformers' Wav2Vec2: " + "; ".join(details))
    return mapped


# --- the vocabulary and the feature extractor ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A fairseq dictionary as a transformers CTC vocabulary (same indices)."""

    tokens: Dict[str, int]
    blank_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    word_delimiter: Optional[str]


def ctc_vocabulary(symbols: Sequence[str], blank: int, pad: int, eos: int, unk: int) -> Vocabulary:
    """The fine-tuning dictionary's symbols at their fairseq indices. transformers' CTC
    blank is the tokenizer's pad token, called ``<pad>``: fairseq's blank (``<s>``,
    index 0) takes that name and fairseq's ``<pad>`` (never a CTC output) takes ``<s>``,
    as in transformers' own conversion of fairseq models."""
    names = list(symbols)
    if len(set(names)) != len(names):
        raise ExportError("the checkpoint's dictionary has repeated symbols")
    if names[blank] != "<s>" or names[pad] != "<pad>" or blank == pad:
        raise ExportError(
            f"the dictionary's blank (index {blank}: {names[blank]!r}) and padding (index {pad}: "
            f"{names[pad]!r}) are not fairseq's '<s>' and '<pad>'"
        )
    names[blank], names[pad] = "<pad>", "<s>"
    tokens = {name: index for index, name in enumerate(names)}
    word_delimiter = "|" if "|" in tokens else None
    return Vocabulary(tokens, blank_id=blank, bos_id=pad, eos_id=eos, unk_id=unk, word_delimiter=word_delimiter)


def checkpoint_dictionary(state: Mapping[str, Any], path: Path):
    """The fine-tuning task's target dictionary: the one fairseq stored in the checkpoint,
    else ``{task.data}/dict.{task.labels}.txt``."""
    from fairseq.data import Dictionary

    stored = (state.get("task_state") or {}).get("target_dictionary")
    if stored is not None:
        return stored
    task = state["cfg"].task
    dictionary_path = Path(str(task.get("data"))) / f"dict.{task.get('labels')}.txt"
    if not dictionary_path.is_file():
        raise ExportError(
            f"checkpoint {path} carries no dictionary and {dictionary_path} (its task.data and "
            "task.labels) does not exist; give the fine-tuning dictionary with --dictionary"
        )
    return Dictionary.load(str(dictionary_path))


# --- export ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportResult:
    kind: str  # "pretraining" or "ctc"
    model_class: str
    out_dir: Path
    num_parameters: int
    files: Tuple[str, ...]
    notes: Tuple[str, ...] = ()
    # verify_export's largest differences to the fairseq model (empty without verify)
    differences: Mapping[str, float] = dataclasses.field(default_factory=dict)


def _import_transformers():
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError as error:
        raise ExportError(f"knnvq-export-hf needs transformers and safetensors ({error}); {HF_EXTRA_HINT}") from None
    return transformers


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out_dir} exists and is not empty; pass --overwrite to replace it")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"output {out_dir}: {parent} is a file, not a folder")
            break


def feature_extractor_for(transformers, task_cfg: Mapping[str, Any], feat_extract_norm: str):
    """fairseq's ``task.normalize`` (zero mean, unit variance per utterance) and sample rate.
    As transformers recommends for wav2vec 2.0, models with a group-norm feature
    extractor are fed without an attention mask (fairseq's batches pad them too)."""
    return transformers.Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=int(task_cfg.get("sample_rate", 16000)),
        padding_value=0.0,
        do_normalize=bool(task_cfg.get("normalize", False)),
        return_attention_mask=feat_extract_norm == "layer",
    )


VERIFY_TOLERANCE = 1e-4
VERIFY_SECONDS = 1.0


def verify_export(
    checkpoint: Path, state: Mapping[str, Any], kind: str, folder: Path, dictionary: Any = None
) -> Dict[str, float]:
    """Runs the fairseq model and the transformers model read back from ``folder`` on the
    same audio (a fixed pseudo-random second at the task's sample rate) and returns the
    largest absolute differences: CNN features, transformer output, quantized vectors
    and the share of differing code indices for a pretraining model; CTC logits for a
    fine-tuned one. ExportError when one exceeds :data:`VERIFY_TOLERANCE`."""
    import transformers

    state = dict(state)
    if dictionary is not None:  # the one exported (it may not be in the checkpoint or its data folder)
        state["task_state"] = dict(state.get("task_state") or {}, target_dictionary=dictionary)
    try:
        fairseq_model, _, _ = load_model(checkpoint, state)
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    sample_rate = int(state["cfg"].task.get("sample_rate", 16000))
    generator = torch.Generator().manual_seed(0)
    audio = 0.1 * torch.randn(1, int(VERIFY_SECONDS * sample_rate), generator=generator)
    if state["cfg"].task.get("normalize", False):
        audio = torch.nn.functional.layer_norm(audio, audio.shape[1:])
    differences: Dict[str, float] = {}
    with torch.no_grad():
        if kind == "pretraining":
            exported = transformers.Wav2Vec2ForPreTraining.from_pretrained(str(folder)).eval()
            features = fairseq_model.layer_norm(fairseq_model.feature_extractor(audio).transpose(1, 2))
            encoded = fairseq_model.extract_features(audio, None, mask=False)["x"]
            quantized = fairseq_model.quantizer(features, produce_targets=True)
            hf_out = exported.wav2vec2(audio)
            hf_quantized, _ = exported.quantizer(hf_out.extract_features)
            logits = exported.quantizer.weight_proj(hf_out.extract_features)
            hf_codes = logits.view(*logits.shape[:2], exported.config.num_codevector_groups, -1).argmax(-1)
            differences["features"] = (hf_out.extract_features - features).abs().max().item()
            differences["hidden_states"] = (hf_out.last_hidden_state - encoded).abs().max().item()
            differences["quantized"] = (hf_quantized - quantized["x"]).abs().max().item()
            differences["code_indices"] = (hf_codes != quantized["targets"]).float().mean().item()
        else:
            exported = transformers.Wav2Vec2ForCTC.from_pretrained(str(folder)).eval()
            fairseq_logits = fairseq_model.get_logits(fairseq_model(source=audio, padding_mask=None)).transpose(0, 1)
            differences["logits"] = (exported(audio).logits - fairseq_logits).abs().max().item()
    too_large = {name: value for name, value in differences.items() if not value <= VERIFY_TOLERANCE}
    if too_large:
        raise ExportError(
            f"the transformers model does not compute what the fairseq model in {checkpoint} computes "
            f"(largest differences {too_large}, tolerance {VERIFY_TOLERANCE}); nothing was written"
        )
    return differences


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    overwrite: bool = False,
    dictionary_path: Optional[Path] = None,
    verify: bool = True,
) -> ExportResult:
    """Writes ``out_dir`` (see the module docstring); every check runs before anything is
    written, and the folder appears complete or not at all. With ``verify`` the written
    model is read back and compared with the fairseq model (:func:`verify_export`)."""
    checkpoint = Path(checkpoint).resolve()
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    transformers = _import_transformers()
    try:
        state = read_checkpoint(checkpoint)  # cfg (OmegaConf) and model weights, upgraded by fairseq
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    kind = checkpoint_kind(state, checkpoint)
    cfg = state["cfg"]
    if kind == "pretraining":
        w2v, task_cfg, finetuning = cfg.model, cfg.task, None
    else:
        w2v, task_cfg, finetuning = cfg.model.w2v_args.model, cfg.task, cfg.model
    rename_old_model_fields(w2v)  # a checkpoint saved with the 0.1.0 field names
    problems = unsupported_settings(w2v, pretraining=kind == "pretraining")
    if (
        finetuning is not None
        and float(finetuning.get("blank_weight", 0.0) or 0.0) != 0.0
        and finetuning.get("blank_mode", "add") != "add"
    ):
        problems.append(
            f"model.blank_mode={finetuning.get('blank_mode')!r} with a blank_weight "
            "(only 'add' folds into the output layer)"
        )
    if problems:
        raise ExportError(
            f"checkpoint {checkpoint} uses settings transformers' Wav2Vec2 cannot represent: " + "; ".join(problems)
        )
    config_kwargs = hf_config_kwargs(w2v, finetuning)
    notes: List[str] = []

    weights = {name: tensor for name, tensor in state["model"].items()}
    if kind == "pretraining":
        criterion = cfg.get("criterion") or {}
        loss_weights = criterion.get("loss_weights") or [0.1]
        config_kwargs["diversity_loss_weight"] = float(loss_weights[0] if loss_weights[0] is not None else 0.0)
        hf_config = transformers.Wav2Vec2Config(**config_kwargs)
        model_class = transformers.Wav2Vec2ForPreTraining
        head_rules, encoder_prefix, vocabulary, dictionary = PRETRAINING_HEAD_RULES, "", None, None
        if w2v.get("regularizer") == "knn":
            notes.append(
                "transformers' Wav2Vec2ForPreTraining loss uses the diversity term, not the KNN "
                "term; the weights and codebook are those trained with it"
            )
    else:
        if dictionary_path is not None:
            from fairseq.data import Dictionary

            if not Path(dictionary_path).is_file():
                raise ExportError(f"--dictionary {dictionary_path} does not exist")
            dictionary = Dictionary.load(str(dictionary_path))
        else:
            dictionary = checkpoint_dictionary(state, checkpoint)
        output_rows = weights["w2v_encoder.proj.weight"].shape[0] if "w2v_encoder.proj.weight" in weights else None
        if output_rows != len(dictionary):
            raise ExportError(
                f"the dictionary has {len(dictionary)} symbols but the model in {checkpoint} has "
                f"{output_rows} outputs: give the dictionary it was fine-tuned with"
            )
        blank = dictionary.bos()  # fairseq's ctc criterion: the task's blank_symbol "<s>"
        vocabulary = ctc_vocabulary(dictionary.symbols, blank, dictionary.pad(), dictionary.eos(), dictionary.unk())
        if vocabulary.word_delimiter is None:
            notes.append(
                "the dictionary has no '|' word boundary (not letters): the tokenizer joins the "
                "units without spaces; turn them into words as fine-tuning's post_process did"
            )
        blank_weight = float(finetuning.get("blank_weight", 0.0) or 0.0)
        if blank_weight:
            # fairseq adds blank_weight to the blank's logit (blank_mode=add): the same as
            # a larger output bias for that row.
            bias = weights["w2v_encoder.proj.bias"].clone()
            bias[blank] += blank_weight
            weights["w2v_encoder.proj.bias"] = bias
        config_kwargs.update(
            vocab_size=len(dictionary),
            pad_token_id=vocabulary.blank_id,
            bos_token_id=vocabulary.bos_id,
            eos_token_id=vocabulary.eos_id,
            ctc_zero_infinity=bool((cfg.get("criterion") or {}).get("zero_infinity", False)),
        )
        hf_config = transformers.Wav2Vec2Config(**config_kwargs)
        model_class = transformers.Wav2Vec2ForCTC
        head_rules, encoder_prefix = CTC_HEAD_RULES, "w2v_encoder.w2v_model."

    model = model_class(hf_config)
    mapped = map_state_dict(weights, model.state_dict(), encoder_prefix, head_rules)
    model.load_state_dict(mapped, strict=True)
    model.eval()
    feature_extractor = feature_extractor_for(transformers, task_cfg, hf_config.feat_extract_norm)

    # After every check; missing parent folders are made as mkdir -p does.
    with atomic_folder(out_dir) as staged:
        model.save_pretrained(str(staged), safe_serialization=True)
        if vocabulary is None:
            feature_extractor.save_pretrained(str(staged))
        else:
            vocab_file = staged / "vocab.json"
            vocab_file.write_text(json.dumps(vocabulary.tokens, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            tokenizer = transformers.Wav2Vec2CTCTokenizer(
                str(vocab_file),
                bos_token="<s>",
                eos_token="</s>",
                unk_token="<unk>",
                pad_token="<pad>",
                word_delimiter_token=vocabulary.word_delimiter or "|",
                do_lower_case=False,
                clean_up_tokenization_spaces=False,
            )
            processor = transformers.Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)
            processor.save_pretrained(str(staged))
        # safetensors writes model.safetensors readable by its owner only (0600); give
        # every file the mode open() gives (0666 less the umask), as the other writers do.
        umask = os.umask(0)
        os.umask(umask)
        for written in staged.iterdir():
            if written.is_file():
                os.chmod(written, 0o666 & ~umask)
        files = tuple(sorted(p.name for p in staged.iterdir()))
        differences = verify_export(checkpoint, state, kind, staged, dictionary) if verify else {}
    return ExportResult(
        kind=kind,
        model_class=model_class.__name__,
        out_dir=out_dir,
        num_parameters=sum(p.numel() for p in model.parameters()),
        files=files,
        notes=tuple(notes),
        differences=differences,
    )
