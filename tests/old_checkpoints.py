"""Checkpoints that the plugin's training did not write, for the fault tests: an old-style
one written by stock fairseq code, and one whose unpickling runs code."""

import os

TINY_W2V_ARGS = [
    "--conv-feature-layers",
    "[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] + [(64, 2, 2)]",
    "--encoder-layers",
    "2",
    "--encoder-embed-dim",
    "64",
    "--encoder-ffn-embed-dim",
    "128",
    "--encoder-attention-heads",
    "2",
    "--final-dim",
    "32",
    "--conv-pos",
    "16",
    "--conv-pos-groups",
    "16",
    "--latent-vars",
    "32",
    "--quantize-targets",
]


def write_old_style_checkpoint(path, data_dir) -> None:
    """A wav2vec 2.0 pretraining checkpoint as fairseq wrote them before hydra (the
    official wav2vec_small.pt): ``args`` is the argparse.Namespace of fairseq's own
    training parser, ``cfg`` is absent, the model is fairseq's stock Wav2Vec2Model."""
    import fairseq  # noqa: F401
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [
            str(data_dir),
            "--task",
            "audio_pretraining",
            "--arch",
            "wav2vec2",
            "--criterion",
            "wav2vec",
            "--optimizer",
            "adam",
            "--lr",
            "0.001",
            "--max-tokens",
            "100000",
            *TINY_W2V_ARGS,
        ],
    )
    model = Wav2Vec2Model.build_model(convert_namespace_to_omegaconf(args).model, None)
    state = {
        "args": args,
        "model": model.state_dict(),
        "extra_state": {},
        "optimizer_history": [
            {
                "criterion_name": "Wav2vecCriterion",
                "optimizer_name": "Adam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 10,
            }
        ],
    }
    checkpoint_utils.torch_persistent_save(state, str(path))


class RunsCode:
    """Unpickling it runs ``touch <marker>`` (posix.system)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
