"""knnvq-export-hf on real tiny checkpoints trained here: the transformers models it writes
compute what fairseq computes (pretraining: CNN features, transformer output, quantized
vectors, code indices, the contrastive projections; CTC: the logits), and transformers'
speech-recognition pipeline decodes the tiny test split to the hypotheses and the WER of
knnvq-infer. Wrong inputs give errors that name them, before anything is written."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import soundfile
import torch

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq import checkpoint_utils
from fairseq_knnvq import hf
from fairseq_knnvq.cli import export_hf, prepare_librispeech
from fairseq_run import CONFIG_DIR, TINY_CORPUS, console_script, run_hydra_train

transformers = pytest.importorskip("transformers")
fairseq_knnvq.register_with_fairseq()

PRETRAIN_UPDATES = 20
# Past CTC's all-blank start (see test_finetuning_e2e), so the hypotheses compared are real.
FINETUNE_UPDATES = 250
TOLERANCE = 1e-4
NUM_PARITY_UTTERANCES = 4


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [console_script("knnvq-export-hf"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def export_error(*argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main([str(a) for a in argv])
    message = str(exit_info.value.code)
    assert message.startswith("knnvq-export-hf: error: "), message
    return message


def dev_audio(data: Path, count: int):
    lines = (data / "valid.tsv").read_text().splitlines()
    root = Path(lines[0])
    for line in lines[1 : 1 + count]:
        audio, rate = soundfile.read(root / line.split("\t")[0], dtype="float32")
        assert rate == 16000
        yield torch.from_numpy(audio)[None]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("hf_data")
    prepare_librispeech.main(
        [
            str(TINY_CORPUS),
            "--dest",
            str(dest),
            "--split",
            "train=train",
            "--split",
            "valid=dev",
            "--split",
            "test=test",
            "--units",
            "letter",
        ]
    )
    return dest


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("hf_pretrain") / "run"
    run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [f"task.data={data}", f"optimization.max_update={PRETRAIN_UPDATES}"],
        run_dir,
    )
    return run_dir / "checkpoints" / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def finetuned(data, pretrained, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_finetune")
    result = subprocess.run(
        [
            console_script("fairseq-hydra-train"),
            "--config-dir",
            str(CONFIG_DIR / "finetuning"),
            "--config-name",
            "tiny",
            f"task.data={data}",
            f"model.w2v_path={pretrained}",
            f"optimization.max_update={FINETUNE_UPDATES}",
            f"checkpoint.save_dir={root / 'checkpoints'}",
            f"hydra.run.dir={root / 'hydra'}",
            f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=str(root),
    )
    assert result.returncode == 0, result.stdout[-5000:]
    return root / "checkpoints" / "checkpoint_best.pt"


def fairseq_model(checkpoint: Path):
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    return models[0].eval(), cfg, task


@pytest.mark.slow
def test_pretraining_export_computes_what_fairseq_computes(pretrained, data, tmp_path):
    out = tmp_path / "hf_pretrained"
    killed = tmp_path / ".hf_pretrained.0a1b2c3d.partial"  # what an export killed by SIGKILL leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    result = run_cli(str(pretrained), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"removing {killed}, left by an interrupted export" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_pretrained"]
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o666 & ~umask for p in out.iterdir()}
    assert "Wav2Vec2ForPreTraining" in result.stdout
    assert "checked against the fairseq model" in result.stdout  # the CLI's own read-back check
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "preprocessor_config.json").read_text())["do_normalize"] is False  # task.normalize

    model, cfg, _ = fairseq_model(pretrained)
    exported = transformers.Wav2Vec2ForPreTraining.from_pretrained(str(out)).eval()
    # The codebook itself, entry for entry.
    assert torch.equal(exported.quantizer.codevectors, model.quantizer.vars)
    groups = cfg.model.latent_groups
    for audio in dev_audio(data, NUM_PARITY_UTTERANCES):
        with torch.no_grad():
            features = model.layer_norm(model.feature_extractor(audio).transpose(1, 2))
            encoded = model.extract_features(audio, None, mask=False)["x"]
            quantized = model.quantizer(features, produce_targets=True)
            hf_out = exported.wav2vec2(audio)
            hf_quantized, _ = exported.quantizer(hf_out.extract_features)
            hf_pretraining = exported(audio)
            # The codes transformers' quantizer picks: argmax of its code logits per group,
            # and its quantized vectors are exactly those codebook entries.
            logits = exported.quantizer.weight_proj(hf_out.extract_features)
            hf_codes = logits.view(*logits.shape[:2], groups, -1).argmax(-1)
            entries = exported.quantizer.codevectors[0].view(groups, -1, exported.quantizer.codevectors.shape[-1])
            from_codes = torch.cat([entries[g][hf_codes[..., g]] for g in range(groups)], dim=-1)
        assert hf_out.extract_features.shape == features.shape
        torch.testing.assert_close(hf_out.extract_features, features, atol=TOLERANCE, rtol=0)
        assert hf_out.last_hidden_state.shape == encoded.shape
        torch.testing.assert_close(hf_out.last_hidden_state, encoded, atol=TOLERANCE, rtol=0)
        assert torch.equal(hf_codes, quantized["targets"])
        assert torch.equal(hf_quantized, from_codes)
        torch.testing.assert_close(hf_quantized, quantized["x"], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(
            hf_pretraining.projected_quantized_states, model.project_q(quantized["x"]), atol=TOLERANCE, rtol=0
        )
        torch.testing.assert_close(hf_pretraining.projected_states, model.final_proj(encoded), atol=TOLERANCE, rtol=0)
        # Not a constant model: the codes vary over the utterance.
        assert hf_codes.unique().numel() > 1


@pytest.mark.slow
def test_ctc_export_logits_and_pipeline_wer_equal_fairseq(finetuned, data, tmp_path):
    out = tmp_path / "hf_ctc"
    assert run_cli(str(finetuned), str(out)).returncode == 0
    assert {"config.json", "model.safetensors", "vocab.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    processor = transformers.Wav2Vec2Processor.from_pretrained(str(out))
    # The fine-tuning task's normalisation (task.normalize=false) and sample rate.
    assert processor.feature_extractor.do_normalize is False and processor.feature_extractor.sampling_rate == 16000

    model, _, task = fairseq_model(finetuned)
    dictionary = task.target_dictionary
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    # fairseq's indices; the blank <s> carries transformers' name for the blank.
    assert vocab["<pad>"] == dictionary.bos() == 0 and vocab["|"] == dictionary.index("|")
    assert all(vocab[s] == i for i, s in enumerate(dictionary.symbols) if s not in ("<s>", "<pad>"))
    exported = transformers.Wav2Vec2ForCTC.from_pretrained(str(out)).eval()
    assert exported.config.pad_token_id == 0
    for audio in dev_audio(data, NUM_PARITY_UTTERANCES):
        with torch.no_grad():
            fairseq_logits = model.get_logits(model(source=audio, padding_mask=None)).transpose(0, 1)
            hf_logits = exported(audio).logits
        assert hf_logits.shape == fairseq_logits.shape
        torch.testing.assert_close(hf_logits, fairseq_logits, atol=TOLERANCE, rtol=0)

    # transformers' ASR pipeline on the test split, one utterance at a time (no padding),
    # against knnvq-infer decoding the same split without padding.
    recognizer = transformers.pipeline("automatic-speech-recognition", model=str(out), device="cpu")
    lines = (data / "test.tsv").read_text().splitlines()
    hypotheses = []
    for line in lines[1:]:
        audio, rate = soundfile.read(Path(lines[0]) / line.split("\t")[0], dtype="float32")
        hypotheses.append(" ".join(recognizer({"raw": audio, "sampling_rate": rate})["text"].split()))
    decoded = subprocess.run(
        [
            console_script("knnvq-infer"),
            str(finetuned),
            "--data",
            str(data),
            "--subset",
            "test",
            "--batch-size",
            "1",
            "--output-dir",
            str(tmp_path / "decode"),
            "--cpu",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert decoded.returncode == 0, decoded.stdout[-3000:]
    summary = json.loads((tmp_path / "decode" / "wer.test.json").read_text())
    fairseq_hypotheses = (tmp_path / "decode" / "hypo.test.txt").read_text(encoding="utf-8").splitlines()
    references = (tmp_path / "decode" / "ref.test.txt").read_text(encoding="utf-8").splitlines()
    assert len(hypotheses) == len(fairseq_hypotheses) == summary["num_utterances"] > 0
    assert sum(len(h.split()) for h in hypotheses) > 0  # not the all-blank model
    assert hypotheses == fairseq_hypotheses
    from fairseq_knnvq.evaluation.speech import word_error_rate

    assert word_error_rate(references, hypotheses).percent == pytest.approx(summary["wer"], abs=1e-4)


@pytest.mark.slow
def test_export_errors_name_the_problem_and_write_nothing(pretrained, finetuned, data, tmp_path, monkeypatch):
    missing = tmp_path / "missing.pt"
    assert str(missing) in export_error(missing, tmp_path / "a")

    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    assert f"{not_a_checkpoint} is not a checkpoint: neither a PyTorch zip archive nor a pickle" in export_error(
        not_a_checkpoint, tmp_path / "b"
    )

    assert "is a file, not a folder" in export_error(pretrained, not_a_checkpoint / "out")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    message = export_error(pretrained, busy)
    assert str(busy) in message and "--overwrite" in message
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    state = torch.load(pretrained, map_location="cpu", weights_only=False)
    state["cfg"]["model"]["_name"] = "vq_image_autoencoder"
    other = tmp_path / "image.pt"
    torch.save(state, other)
    message = export_error(other, tmp_path / "c")
    assert "'vq_image_autoencoder'" in message and "wav2vec2_knnvq" in message

    state = torch.load(pretrained, map_location="cpu", weights_only=False)
    state["cfg"]["model"]["quantizer_depth"] = 2
    state["cfg"]["model"]["layer_type"] = "conformer"
    deep = tmp_path / "deep.pt"
    torch.save(state, deep)
    message = export_error(deep, tmp_path / "d")
    assert "model.quantizer_depth=2" in message and "model.layer_type='conformer'" in message

    # A CTC checkpoint without its dictionary, whose data folder has none either.
    state = torch.load(finetuned, map_location="cpu", weights_only=False)
    del state["task_state"]
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (copy / "dict.ltr.txt").unlink()
    state["cfg"]["task"]["data"] = str(copy)
    older = tmp_path / "older.pt"
    torch.save(state, older)
    message = export_error(older, tmp_path / "e")
    assert str(copy / "dict.ltr.txt") in message and "--dictionary" in message
    short = tmp_path / "short_dict.txt"
    short.write_text("".join((data / "dict.ltr.txt").read_text().splitlines(keepends=True)[:-1]))
    assert "give the dictionary it was fine-tuned with" in export_error(older, tmp_path / "e", "--dictionary", short)
    assert not any((tmp_path / name).exists() for name in "abcde")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind

    # The read-back check catches a wrong mapping (queries and keys swapped: same shapes).
    swapped = [(pattern.replace("(q|k|v|out)_proj", "(v|out)_proj"), target) for pattern, target in hf.ENCODER_RULES]
    swapped += [
        (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"encoder.layers.\1.attention.k_proj.\2"),
        (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"encoder.layers.\1.attention.q_proj.\2"),
    ]
    monkeypatch.setattr(hf, "ENCODER_RULES", swapped)
    message = export_error(pretrained, tmp_path / "g")
    assert "does not compute what the fairseq model" in message and "hidden_states" in message
    assert not (tmp_path / "g").exists()
    monkeypatch.undo()

    # With the right dictionary the export works and equals the one from the stored dictionary.
    export_hf.main([str(older), str(tmp_path / "e"), "--dictionary", str(data / "dict.ltr.txt")])
    export_hf.main([str(finetuned), str(tmp_path / "f")])
    assert (tmp_path / "e" / "vocab.json").read_text() == (tmp_path / "f" / "vocab.json").read_text()
    # Missing parent folders are created (after the checks), as mkdir -p does.
    export_hf.main([str(pretrained), str(tmp_path / "new" / "folders" / "g"), "--no-verify"])
    assert (tmp_path / "new" / "folders" / "g" / "model.safetensors").is_file()
    # fairseq's blank_weight (added to the blank's logit) is folded into the output bias;
    # the export's read-back check compares with fairseq's get_logits, which adds it.
    state = torch.load(finetuned, map_location="cpu", weights_only=False)
    state["cfg"]["model"]["blank_weight"] = 1.5
    weighted = tmp_path / "blank_weight.pt"
    torch.save(state, weighted)
    export_hf.main([str(weighted), str(tmp_path / "h")])
    bias = transformers.Wav2Vec2ForCTC.from_pretrained(str(tmp_path / "h")).lm_head.bias.detach()
    expected = state["model"]["w2v_encoder.proj.bias"].clone()
    expected[0] += 1.5
    assert torch.equal(bias, expected)
    state["cfg"]["model"]["blank_mode"] = "set"
    torch.save(state, weighted)
    assert "model.blank_mode='set'" in export_error(weighted, tmp_path / "i")

    # --overwrite replaces a folder.
    export_hf.main([str(pretrained), str(tmp_path / "f"), "--overwrite"])
    assert json.loads((tmp_path / "f" / "config.json").read_text())["architectures"] == ["Wav2Vec2ForPreTraining"]
    assert not (tmp_path / "f" / "vocab.json").exists()


def test_conv_layer_spec_and_vocabulary():
    assert hf.parse_conv_layers("[(64, 10, 5)] + [(64, 3, 2)] * 2 + [(32,2,2)]") == [
        (64, 10, 5),
        (64, 3, 2),
        (64, 3, 2),
        (32, 2, 2),
    ]
    with pytest.raises(hf.ExportError, match="conv_feature_layers"):
        hf.parse_conv_layers("__import__('os').getcwd()")
    vocabulary = hf.ctc_vocabulary(["<s>", "<pad>", "</s>", "<unk>", "|", "E"], blank=0, pad=1, eos=2, unk=3)
    assert vocabulary.tokens == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5}
    assert (vocabulary.blank_id, vocabulary.bos_id, vocabulary.word_delimiter) == (0, 1, "|")


def test_large_style_architecture_round_trips(tmp_path):
    """The other branch of wav2vec 2.0 (LV-60 / large style): layer-norm CNN with biases,
    pre-norm transformer, an encoder wider than the CNN (post_extract_proj), one codebook
    group with its own latent_dim, and task.normalize. A randomly initialised model (every
    weight perturbed, so no norm is an identity), saved in fairseq's checkpoint layout,
    exports and computes what fairseq computes."""
    from omegaconf import OmegaConf

    from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig, Wav2Vec2KnnVqModel

    cfg = Wav2Vec2KnnVqConfig(
        extractor_mode="layer_norm",
        layer_norm_first=True,
        conv_bias=True,
        conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2",
        encoder_layers=2,
        encoder_embed_dim=48,
        encoder_ffn_embed_dim=96,
        encoder_attention_heads=4,
        conv_pos=8,
        conv_pos_groups=4,
        final_dim=24,
        latent_dim=16,
        latent_vars=20,
        latent_groups=1,
        quantize_targets=True,
        activation_fn="relu",
    )
    cfg._name = "wav2vec2_knnvq"
    torch.manual_seed(0)
    model = Wav2Vec2KnnVqModel(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert model.post_extract_proj is not None
    state = {
        "cfg": {
            "model": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True),
            "task": {"_name": "audio_pretraining", "data": str(tmp_path), "normalize": True, "sample_rate": 16000},
            "criterion": {"_name": "wav2vec_knnvq", "loss_weights": [0.1, 10]},
        },
        "model": model.state_dict(),
        "optimizer_history": [{"num_updates": 0, "optimizer_name": "adam", "lr_scheduler_state": {"best": None}}],
        "extra_state": {"train_iterator": {"epoch": 1}},
    }
    checkpoint = tmp_path / "large_style.pt"
    torch.save(state, checkpoint)

    result = hf.export_checkpoint(checkpoint, tmp_path / "hf")
    assert set(result.differences) == {"features", "hidden_states", "quantized", "code_indices"}
    assert all(value <= hf.VERIFY_TOLERANCE for value in result.differences.values())
    exported = transformers.Wav2Vec2ForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    config = exported.config
    assert (config.feat_extract_norm, config.do_stable_layer_norm, config.conv_bias, config.hidden_act) == (
        "layer",
        True,
        True,
        "relu",
    )
    assert (config.num_codevector_groups, config.codevector_dim, config.proj_codevector_dim) == (1, 16, 24)
    assert json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())["do_normalize"] is True
    model.eval()
    audio = torch.nn.functional.layer_norm(0.1 * torch.randn(1, 8000), (8000,))
    with torch.no_grad():
        torch.testing.assert_close(
            exported.wav2vec2(audio).last_hidden_state,
            model.extract_features(audio, None, mask=False)["x"],
            atol=TOLERANCE,
            rtol=0,
        )
