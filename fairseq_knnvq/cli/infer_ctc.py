"""``knnvq-infer``: decode a manifest with a CTC fine-tuned checkpoint and score it.

::

    knnvq-infer /exp/ft/checkpoint_best.pt --data /data/manifests --subset test_clean \\
        --output-dir /exp/ft/decode

reads ``{data}/{subset}.tsv`` and the reference labels ``{data}/{subset}.{labels}``
(``labels`` defaults to the one the checkpoint was fine-tuned with, e.g. ``ltr``),
decodes every utterance with CTC greedy (Viterbi) decoding, or with a beam search over
an n-gram language model (``--lm``), and writes, in manifest order::

    <output-dir>/hypo.<subset>.txt   one hypothesis per line (words)
    <output-dir>/ref.<subset>.txt    the reference words of the same line
    <output-dir>/wer.<subset>.json   WER and CER in percent, with the error and length
                                     counts they are computed from

(``*.<subset>.beam.*`` for a beam search, whose JSON also records the LM, the lexicon and
every option of the search.)

Beam search (``--lm LM.arpa|LM.bin``, needs the ``lm`` extra, flashlight-text) is
fairseq's ``kenlm`` decoder: with ``--lexicon`` (fairseq's ``WORD W O R D |`` format) or
``--lexicon-words`` (a word list or transcripts, each word spelled in letters with the
word boundary ``|``) a lexicon search whose word LM scores whole words; without one a
lexicon-free search whose LM scores the model's units (an LM over ``.ltr`` lines).
The options default to fairseq's decoder config (``fairseq_knnvq.evaluation.beam_search``).

Greedy decoding is what fairseq's ``ctc`` criterion does during validation: the most
likely unit of every non-padded frame, repeats collapsed, the blank (the task's
``blank_symbol``, else the dictionary's ``<s>``) dropped, the units joined and turned
into words by the same ``post_process`` (``letter``: ``|`` is the word boundary;
``sentencepiece``: ``\u2581`` starts a word). Batches are by default those of the
fine-tuning run's validation, so on the same checkpoint and subset the WER here equals
the ``wer`` that fine-tuning logged. WER is word-level edit distance over the number of
reference words; CER is character-level edit distance (spaces between words count)
over the number of reference characters. Both are summed over the subset before
dividing, and reported in percent.

The checkpoint is loaded with fairseq's own ``load_model_ensemble_and_task`` after this
plugin is registered, so fine-tuned ``wav2vec2_knnvq`` models need no ``--user-dir``
(``--user-dir`` imports other plugins). The units are those of the dictionary stored
in the checkpoint (fairseq keeps the fine-tuning task's dictionary there);
``{data}/dict.{labels}.txt`` is read only for a checkpoint without one. The data folder
and labels given here replace those stored in the checkpoint, and the pretrained
model's weights are inside the fine-tuned checkpoint, so it still decodes after it, the
data or the pretrained checkpoint have moved. Every output file is written atomically
(a temporary file, then a rename), the JSON summary last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fairseq_knnvq.cli.help_format import DefaultsHelpFormatter
from fairseq_knnvq.cli.outputs import output_folder_problem
from fairseq_knnvq.preparation.labels import describe_unknown_units, find_unknown_units
from fairseq_knnvq.preparation.manifest import ManifestError, check_audio_files, list_problems, read_manifest
from fairseq_knnvq.evaluation.beam_search import (
    BeamSearchError,
    BeamSearchOptions,
    check_spellings,
    import_flashlight,
    lexicon_from_words,
    read_lexicon,
)
from fairseq_knnvq.evaluation.speech import (
    Batching,
    char_error_rate,
    decode_subset,
    detect_post_process,
    task_blank,
    units_to_words,
    word_error_rate,
)
from fairseq_knnvq.files import write_files_atomically

DEFAULT_MAX_TOKENS = 1_600_000  # audio samples per batch: 100 s at 16 kHz


class InferenceError(Exception):
    """A problem with the checkpoint, the data or the options that the user has to fix."""


# --- checks of the inputs, before the model is built -------------------------------


def load_checkpoint_state(path: Path, data_dir: Path | None, labels: str | None) -> tuple[dict[str, Any], str | None]:
    """The checkpoint's state with the task's data folder and labels replaced, and the
    labels it was fine-tuned with (None for a model that was not fine-tuned)."""
    from fairseq.dataclass.utils import overwrite_args_by_name

    from fairseq_knnvq.checkpoints import CheckpointError, read_checkpoint

    task_overrides: dict[str, Any] = {
        # Decode whole utterances: a fine-tuning config's crop or minimum length would
        # otherwise shorten or drop some of them.
        "max_sample_size": None,
        "min_sample_size": None,
    }
    if data_dir is not None:
        task_overrides["data"] = str(data_dir)
    if labels is not None:
        task_overrides["labels"] = labels
    try:
        state = read_checkpoint(path)
    except CheckpointError as error:
        raise InferenceError(str(error)) from None
    trained_labels = state["cfg"].task.get("labels")
    overwrite_args_by_name(state["cfg"], {"task": task_overrides})
    return state, trained_labels


def check_models_registered(state: dict[str, Any], path: Path, trained_labels: str | None) -> None:
    """Every model and task the checkpoint needs must be registered in this process."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    cfg = state["cfg"]
    needed = [("model", cfg.model.get("_name"), MODEL_REGISTRY.keys() | ARCH_MODEL_REGISTRY.keys())]
    needed.append(("task", cfg.task.get("_name"), TASK_REGISTRY.keys()))
    pretrained = cfg.model.get("w2v_args", None)
    if pretrained is not None:
        needed.append(
            ("pretrained model", pretrained.model.get("_name"), MODEL_REGISTRY.keys() | ARCH_MODEL_REGISTRY.keys())
        )
        needed.append(("pretrained task", pretrained.task.get("_name"), TASK_REGISTRY.keys()))
    missing = [f"{kind} '{name}'" for kind, name, registry in needed if name is not None and name not in registry]
    if missing:
        user_dir = cfg.common.get("user_dir") if cfg.get("common") is not None else None
        trained_with = f" It was trained with common.user_dir={user_dir}." if user_dir else ""
        raise InferenceError(
            f"checkpoint {path} needs the fairseq {', '.join(missing)}, which no imported plugin "
            f"registers.{trained_with} Pass --user-dir with the folder of the plugin that "
            "defines it (fairseq-knnvq's own models are registered automatically when the "
            "package is installed: pip install fairseq-knnvq)."
        )
    if trained_labels is None:
        raise InferenceError(
            f"checkpoint {path} is not a CTC fine-tuned model (its task "
            f"'{cfg.task.get('_name')}' has no labels; model '{cfg.model.get('_name')}'). "
            "Fine-tune it first (configs/finetuning/*.yaml) and decode the checkpoint that writes."
        )


@dataclasses.dataclass(frozen=True)
class ReferenceData:
    manifest_path: Path
    label_path: Path
    label_lines: tuple[str, ...]
    audio_seconds: float
    num_samples: tuple[int, ...] = ()  # of each manifest line, in order


def checkpoint_has_dictionary(state: dict[str, Any]) -> bool:
    """fairseq stores the fine-tuning task's target dictionary in the checkpoint
    ("task_state") and puts it back on loading, so the data folder's is then unused."""
    return "target_dictionary" in (state.get("task_state") or {})


def check_data(data_dir: Path, subset: str, labels: str, sample_rate: int, need_dictionary: bool) -> ReferenceData:
    """The manifest and labels (and, if the checkpoint has none, the dictionary) exist,
    agree in length and name existing audio."""
    manifest_path = data_dir / f"{subset}.tsv"
    label_path = data_dir / f"{subset}.{labels}"
    dictionary_path = data_dir / f"dict.{labels}.txt"
    if not data_dir.is_dir():
        raise InferenceError(f"data folder {data_dir} does not exist (give --data, the folder with {subset}.tsv)")
    if not manifest_path.is_file():
        raise InferenceError(
            f"manifest {manifest_path} does not exist; write it with knnvq-prepare-librispeech "
            f"(--split {subset}=...) or give the right --subset"
        )
    manifest = read_manifest(manifest_path)
    if not manifest.entries:
        raise InferenceError(f"manifest {manifest_path} lists no audio files: nothing to decode")
    missing_audio = [str(entry.source_path) for entry in manifest.entries if not entry.source_path.is_file()]
    if missing_audio:
        raise InferenceError(
            f"{len(missing_audio)} audio files of {manifest_path} do not exist, e.g. {missing_audio[0]} "
            "(line 1 of the manifest is the folder they are relative to)"
        )
    # Decoded to the end first: a WER over a file that holds NaN (or that no longer
    # decodes) would not be the model's WER.
    bad_audio = [c for c in check_audio_files([entry.source_path for entry in manifest.entries]) if c.read_error]
    if bad_audio:
        raise InferenceError(
            f"{len(bad_audio)} audio files of {manifest_path} cannot be scored:\n"
            + list_problems([f"{c.path}: {c.read_error}" for c in bad_audio])
            + "\nReplace them with intact copies, or leave them out of the manifest (and the same lines out "
            "of the labels). Nothing was decoded"
        )
    needed = [(label_path, "reference labels")] + ([(dictionary_path, "label dictionary")] if need_dictionary else [])
    for path, what in needed:
        if not path.is_file():
            raise InferenceError(
                f"{what} {path} does not exist; knnvq-prepare-librispeech writes it "
                f"(--units letter for ltr, --units spm for spm), or pass --labels with the "
                "label extension the model was fine-tuned with"
            )
    with open(label_path, encoding="utf-8") as label_file:
        label_lines = tuple(line.rstrip("\n") for line in label_file)
    if len(label_lines) != len(manifest.entries):
        raise InferenceError(
            f"{label_path} has {len(label_lines)} lines but {manifest_path} lists "
            f"{len(manifest.entries)} audio files; both must come from the same preparation run"
        )
    audio_seconds = manifest.total_frames / sample_rate
    return ReferenceData(
        manifest_path, label_path, label_lines, audio_seconds, tuple(entry.num_frames for entry in manifest.entries)
    )


def check_clip_lengths(reference: ReferenceData, min_samples: int, sample_rate: int) -> None:
    """Stops, naming them, when clips of the manifest are shorter than ``min_samples``."""
    short = [(line, n) for line, n in enumerate(reference.num_samples, start=2) if n < min_samples]
    if short:
        shown = ", ".join(f"line {line} ({n} samples)" for line, n in short[:10])
        more = f" ... and {len(short) - 10} more" if len(short) > 10 else ""
        raise InferenceError(
            f"{len(short)} clips of {reference.manifest_path} are shorter than the model's receptive field "
            f"({min_samples} samples, {1000 * min_samples / sample_rate:g} ms at {sample_rate} Hz), so the model "
            f"gives them no output frame: {shown}{more}. Leave them out of the manifest (and the same lines "
            f"out of {reference.label_path.name}), or pad them with silence"
        )


# --- decoding -----------------------------------------------------------------------


def import_plugins(user_dir: str | None) -> None:
    """This plugin's fairseq parts, and those of the plugin folder ``user_dir``."""
    from fairseq import utils

    from fairseq_knnvq.checkpoints import register_plugins

    register_plugins()
    if user_dir is not None:
        if not os.path.isdir(user_dir):
            raise InferenceError(f"--user-dir {user_dir} is not a folder")
        try:
            utils.import_user_module(argparse.Namespace(user_dir=user_dir))
        except ImportError as error:
            raise InferenceError(f"--user-dir {user_dir} could not be imported: {error}") from None


def build_model(state: dict[str, Any], path: Path, device: str):
    from fairseq_knnvq.checkpoints import CheckpointError, load_model

    try:
        return load_model(path, state, device)
    except CheckpointError as error:
        if not isinstance(error.__cause__, RuntimeError) or "size mismatch" not in error.detail:
            raise InferenceError(str(error)) from None
        # Only a checkpoint without its own dictionary gets here (see checkpoint_has_dictionary).
        dictionary_path = Path(state["cfg"].task.data) / f"dict.{state['cfg'].task.labels}.txt"
        raise InferenceError(
            f"the model in {path} does not fit the dictionary {dictionary_path} "
            f"({str(error.__cause__).splitlines()[-1].strip()}): decode with the dictionary it was fine-tuned with"
        ) from None


def choose_batching(args: argparse.Namespace, dataset_cfg: Any) -> Batching:
    """The options given, else the checkpoint's validation batching.

    wav2vec 2.0's convolutional feature encoder (and its group norm) also sees the
    zeros that pad short utterances in a batch, so a model's output depends slightly on
    which utterances share a batch. Batching as fine-tuning validated reproduces the WER
    it logged; ``--batch-size 1`` decodes every utterance without padding."""
    if args.max_tokens is not None or args.batch_size is not None:
        return Batching(args.max_tokens, args.batch_size, 1)
    if dataset_cfg is None:
        return Batching(DEFAULT_MAX_TOKENS, None, 1)
    max_tokens = dataset_cfg.get("max_tokens_valid") or dataset_cfg.get("max_tokens")
    batch_size = dataset_cfg.get("batch_size_valid") or dataset_cfg.get("batch_size")
    if max_tokens is None and batch_size is None:
        max_tokens = DEFAULT_MAX_TOKENS
    return Batching(max_tokens, batch_size, dataset_cfg.get("required_batch_size_multiple") or 1)


BEAM_OPTIONS = {  # option -> field of BeamSearchOptions
    "--beam": "beam",
    "--beam-threshold": "beam_threshold",
    "--lm-weight": "lm_weight",
    "--word-score": "word_score",
    "--sil-weight": "sil_weight",
    "--unk-weight": "unk_weight",
    "--beam-size-token": "beam_size_token",
}


def choose_decoding(args: argparse.Namespace) -> BeamSearchOptions | None:
    """None for greedy decoding, else the beam search's options (fairseq's defaults for
    those not given). Checked before the model is loaded."""
    given = [option for option, field in BEAM_OPTIONS.items() if getattr(args, field) is not None]
    given += [
        o
        for o, v in (("--lm", args.lm), ("--lexicon", args.lexicon), ("--lexicon-words", args.lexicon_words))
        if v is not None
    ]
    decoder = args.decoder or ("beam" if given else "greedy")
    if decoder == "greedy":
        beam_only = given
        if beam_only:
            raise InferenceError(f"{', '.join(beam_only)} are options of the beam search: drop --decoder greedy")
        return None
    if args.lexicon is not None and args.lexicon_words is not None:
        raise InferenceError("give --lexicon or --lexicon-words, not both")
    if (args.lexicon or args.lexicon_words) is not None and args.lm is None:
        raise InferenceError("a lexicon search needs a word language model: give --lm (knnvq-ngram-lm writes one)")
    for option, path in (("--lm", args.lm), ("--lexicon", args.lexicon), ("--lexicon-words", args.lexicon_words)):
        if path is not None and not path.is_file():
            raise InferenceError(f"{option} {path} does not exist")
    try:
        import_flashlight("--lm" if args.lm is not None else "--decoder beam")
    except BeamSearchError as error:
        raise InferenceError(str(error)) from None
    options = BeamSearchOptions(
        **{field: getattr(args, field) for field in BEAM_OPTIONS.values() if getattr(args, field) is not None}
    )
    if options.beam < 1 or (options.beam_size_token is not None and options.beam_size_token < 1):
        raise InferenceError("--beam and --beam-size-token must be at least 1")
    return options


def build_beam_search(args: argparse.Namespace, options: BeamSearchOptions, dictionary, blank: int):
    from fairseq_knnvq.evaluation.beam_search import CtcBeamSearch

    try:
        lexicon = None
        if args.lexicon is not None:
            lexicon = read_lexicon(args.lexicon)
            source = f"lexicon {args.lexicon}"
        elif args.lexicon_words is not None:
            lexicon = lexicon_from_words(args.lexicon_words, dictionary.symbols)
            source = f"--lexicon-words {args.lexicon_words}"
        if lexicon is not None:
            check_spellings(lexicon, dictionary.indices, source)
        return CtcBeamSearch(dictionary.symbols, blank, options, args.lm, lexicon)
    except BeamSearchError as error:
        raise InferenceError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knnvq-infer",
        description="Decode a manifest with a CTC fine-tuned checkpoint (greedy/Viterbi) and report WER and CER.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="fine-tuned checkpoint (.pt) written by fairseq-hydra-train")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with SUBSET.tsv, SUBSET.LABELS and dict.LABELS.txt (default: the checkpoint's task.data)",
    )
    parser.add_argument("--subset", required=True, help="manifest name to decode, e.g. dev_other or test_clean")
    parser.add_argument(
        "--labels", default=None, help="label extension, e.g. ltr or spm (default: the checkpoint's task.labels)"
    )
    parser.add_argument(
        "--post-process",
        default="auto",
        choices=("auto", "letter", "sentencepiece", "none"),
        help="how units become words; auto: letter if the dictionary has '|', sentencepiece if it has \u2581 pieces",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="audio samples per batch (default, with --batch-size: the checkpoint's validation batching, "
        f"else {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="utterances per batch at most; 1 decodes without padding"
    )
    search = parser.add_argument_group(
        "beam search",
        "CTC beam search with an n-gram LM (fairseq's kenlm decoder; needs flashlight-text: "
        "pip install 'fairseq-knnvq[lm]'). Defaults, from fairseq's decoder config: "
        + ", ".join(
            f"--{field.replace('_', '-')} {value}"
            for field, value in BeamSearchOptions().as_record().items()
            if value is not None
        ),
    )
    search.add_argument(
        "--decoder",
        choices=("greedy", "beam"),
        default=None,
        help="default: beam when --lm, a lexicon or a beam option is given, else greedy",
    )
    search.add_argument(
        "--lm",
        type=Path,
        default=None,
        help="KenLM language model, ARPA or binary: over words with a lexicon, over the model's "
        "units without one (knnvq-ngram-lm writes ARPA files from transcripts)",
    )
    search.add_argument(
        "--lexicon", type=Path, default=None, help="lines 'WORD U1 U2 ... |': each word spelled in the model's units"
    )
    search.add_argument(
        "--lexicon-words",
        type=Path,
        default=None,
        help="a word list or transcripts (e.g. train.wrd): every word spelled in letters with '|' at its end",
    )
    search.add_argument("--beam", type=int, default=None, help="hypotheses kept per frame")
    search.add_argument("--beam-threshold", type=float, default=None, help="drop hypotheses this far below the best")
    search.add_argument("--lm-weight", type=float, default=None, help="weight of the LM's log10 score")
    search.add_argument("--word-score", type=float, default=None, help="added for every word (lexicon search)")
    search.add_argument("--sil-weight", type=float, default=None, help="added for every silence unit ('|')")
    search.add_argument("--unk-weight", type=float, default=None, help="added for a word out of the lexicon")
    search.add_argument("--beam-size-token", type=int, default=None, help="units tried per frame (default: all)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the hypothesis, reference and WER files go (default: the checkpoint's folder)",
    )
    parser.add_argument(
        "--user-dir", default=None, help="another fairseq plugin folder to import (fairseq-knnvq is always registered)"
    )
    parser.add_argument("--cpu", action="store_true", help="decode on the CPU even when a GPU is available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Decode and score as ``args`` asks; returns the summary that is written as JSON."""
    import torch

    checkpoint: Path = args.checkpoint.resolve()
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise InferenceError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise InferenceError(f"--batch-size must be positive, got {args.batch_size}")
    if not checkpoint.is_file():
        raise InferenceError(f"checkpoint {checkpoint} does not exist (give the .pt file that fine-tuning wrote)")
    output_dir: Path = (args.output_dir or checkpoint.parent).resolve()
    problem = output_folder_problem(
        output_dir, "--output-dir" if args.output_dir else "--output-dir (default: the checkpoint's folder)"
    )
    if problem:
        raise InferenceError(problem)
    beam_options = choose_decoding(args)
    import_plugins(args.user_dir)

    data_dir = args.data.resolve() if args.data is not None else None
    state, trained_labels = load_checkpoint_state(checkpoint, data_dir, args.labels)
    check_models_registered(state, checkpoint, trained_labels)
    task_cfg = state["cfg"].task
    if data_dir is None:
        data_dir = Path(task_cfg.data)
    labels = task_cfg.labels
    reference = check_data(
        data_dir,
        args.subset,
        labels,
        int(task_cfg.get("sample_rate", 16000)),
        need_dictionary=not checkpoint_has_dictionary(state),
    )

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    started = time.perf_counter()
    model, _, task = build_model(state, checkpoint, device)
    from fairseq_knnvq.checkpoints import min_input_samples

    check_clip_lengths(reference, min_input_samples(model), int(task_cfg.get("sample_rate", 16000)))
    dictionary = task.target_dictionary
    unknown = find_unknown_units(reference.label_lines, dictionary.indices)
    if unknown is not None:
        raise InferenceError(
            describe_unknown_units(str(reference.label_path), unknown, "the model's dictionary")
            + f"; the model was fine-tuned with labels={trained_labels} of another preparation: "
            "give the --labels (and --data) it was fine-tuned with"
        )
    post_process = detect_post_process(dictionary.symbols) if args.post_process == "auto" else args.post_process

    decoder = None if beam_options is None else build_beam_search(args, beam_options, dictionary, task_blank(task))

    batching = choose_batching(args, state["cfg"].get("dataset"))
    decoded = decode_subset(model, task, args.subset, batching, device, not args.no_progress, decoder)
    decode_seconds = time.perf_counter() - started
    hypotheses = [
        " ".join(words)
        if words is not None
        else units_to_words(dictionary.string(torch.tensor(units, dtype=torch.long)), post_process)
        for units, words in decoded
    ]
    references = [units_to_words(line, post_process) for line in reference.label_lines]
    wer = word_error_rate(references, hypotheses)
    cer = char_error_rate(references, hypotheses)

    summary = {
        "checkpoint": str(checkpoint),
        "data": str(data_dir),
        "subset": args.subset,
        "labels": labels,
        "post_process": post_process,
        "decoding": "ctc_greedy" if beam_options is None else "ctc_beam_search",
        "num_utterances": len(references),
        "wer": round(wer.percent, 4),
        "cer": round(cer.percent, 4),
        "num_word_errors": wer.errors,
        "num_words": wer.reference_length,
        "num_char_errors": cer.errors,
        "num_chars": cer.reference_length,
        "audio_seconds": round(reference.audio_seconds, 3),
        "decode_seconds": round(decode_seconds, 3),
        "device": device,
        "max_tokens": batching.max_tokens,
        "batch_size": batching.batch_size,
    }
    name = args.subset
    if beam_options is not None:
        summary["beam_search"] = {
            "lm": str(args.lm.resolve()) if args.lm is not None else None,
            "lexicon": str((args.lexicon or args.lexicon_words).resolve())
            if (args.lexicon or args.lexicon_words)
            else None,
            "lexicon_kind": "lexicon" if args.lexicon else ("words" if args.lexicon_words else None),
            "search": "lexicon" if decoder.lexicon is not None else "lexicon_free",
            **beam_options.as_record(),
        }
        name = f"{args.subset}.beam"
    output_dir.mkdir(parents=True, exist_ok=True)
    write_files_atomically(
        {
            output_dir / f"hypo.{name}.txt": "".join(f"{line}\n" for line in hypotheses),
            output_dir / f"ref.{name}.txt": "".join(f"{line}\n" for line in references),
        }
    )
    # Last, so that a summary on disk always belongs to complete hypothesis files.
    write_files_atomically({output_dir / f"wer.{name}.json": json.dumps(summary, indent=2) + "\n"})
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (InferenceError, ManifestError) as error:
        raise SystemExit(f"knnvq-infer: error: {error}") from None
    print(
        f"{summary['subset']}: WER {summary['wer']:.2f}% ({summary['num_word_errors']}/{summary['num_words']} words), "
        f"CER {summary['cer']:.2f}%, {summary['num_utterances']} utterances",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
