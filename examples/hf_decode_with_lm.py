"""Decode a manifest with an exported CTC model (``knnvq-export-hf``) in transformers,
greedily and with an n-gram LM through ``Wav2Vec2ProcessorWithLM`` (pyctcdecode + kenlm),
and print both WERs.

    pip install pyctcdecode kenlm   # not extras of this package: pyctcdecode 0.5.0 pins numpy < 2
    python examples/hf_decode_with_lm.py HF_FOLDER --data DATA --subset test --lm LM.arpa [--unigrams train.wrd]

``DATA`` is a knnvq-prepare-librispeech folder (``SUBSET.tsv`` and ``SUBSET.wrd``). The
vocabulary's ``<pad>`` (the CTC blank) becomes pyctcdecode's blank and ``|`` its word
delimiter. pyctcdecode runs its own beam search (no lexicon; the words of ``--unigrams``
guide it), with its own defaults (alpha 0.5, beta 1.5), so its WER is not that of
``knnvq-infer --lm``'s flashlight search.
"""

import argparse
from pathlib import Path

import editdistance
import soundfile
import torch
from pyctcdecode import build_ctcdecoder
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor, Wav2Vec2ProcessorWithLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--subset", default="test")
    parser.add_argument("--lm", type=Path, required=True, help="ARPA or KenLM binary word LM")
    parser.add_argument("--unigrams", type=Path, default=None, help="text whose words pyctcdecode knows")
    args = parser.parse_args()

    processor = Wav2Vec2Processor.from_pretrained(args.folder)
    model = Wav2Vec2ForCTC.from_pretrained(args.folder).eval()
    vocabulary = processor.tokenizer.get_vocab()
    labels = [
        {"<pad>": "", "|": " "}.get(token, token) for token, _ in sorted(vocabulary.items(), key=lambda kv: kv[1])
    ]
    unigrams = sorted(set(args.unigrams.read_text().split())) if args.unigrams else None
    with_lm = Wav2Vec2ProcessorWithLM(
        feature_extractor=processor.feature_extractor,
        tokenizer=processor.tokenizer,
        decoder=build_ctcdecoder(labels, kenlm_model_path=str(args.lm), unigrams=unigrams),
    )

    lines = (args.data / f"{args.subset}.tsv").read_text().splitlines()
    root, files = Path(lines[0]), [line.split("\t")[0] for line in lines[1:]]
    references = (args.data / f"{args.subset}.wrd").read_text().splitlines()
    errors = {"greedy": 0, "lm": 0}
    for file, reference in zip(files, references):
        audio, rate = soundfile.read(root / file, dtype="float32")
        with torch.no_grad():
            logits = model(processor(audio, sampling_rate=rate, return_tensors="pt").input_values).logits
        hypotheses = {
            "greedy": processor.batch_decode(logits.argmax(-1))[0],
            "lm": with_lm.batch_decode(logits.numpy()).text[0],
        }
        for kind, hypothesis in hypotheses.items():
            errors[kind] += editdistance.eval(reference.split(), hypothesis.split())
    words = sum(len(r.split()) for r in references)
    for kind, count in errors.items():
        print(f"{args.subset} WER {kind}: {100 * count / words:.2f} % ({count}/{words} words)")


if __name__ == "__main__":
    main()
