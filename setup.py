"""fairseq-knnvq: KNN-to-simplex-vertex regularised smoothed vector quantization for fairseq."""

from setuptools import find_packages, setup

setup(
    name="fairseq-knnvq",
    version="0.2.0",
    description=(
        "A fairseq plugin that fixes code collapse in smoothed vector quantization "
        "with a KNN-to-simplex-vertex regulariser"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["fairseq_knnvq", "fairseq_knnvq.*"]),
    include_package_data=True,
    package_data={"fairseq_knnvq": ["py.typed"]},
    install_requires=[
        "torch>=2.0",
        "numpy",
        # The official fairseq wheel does not import on Python >= 3.11 (dataclass
        # mutable-default error); ve-fairseq is a wheel build of fairseq main that does.
        "ve-fairseq==0.12.3; python_version >= '3.11'",
        "fairseq>=0.12.2; python_version < '3.11'",
        "hydra-core>=1.3.2",
        "omegaconf>=2.3",
        "soundfile",
        "sentencepiece",
        "Pillow",
        "editdistance",
        "tqdm",
    ],
    extras_require={
        "plots": ["matplotlib"],
        # knnvq-export-hf (checked with transformers 5.24.0, safetensors 0.8.0).
        "hf": ["transformers>=4.40", "safetensors"],
        # common.tensorboard_logdir=... (fairseq writes its scalars with torch's SummaryWriter).
        "tensorboard": ["tensorboard"],
        # knnvq-infer --lm: CTC beam search with a KenLM model (flashlight-text has KenLM built in;
        # checked with flashlight-text 0.0.7).
        "lm": ["flashlight-text>=0.0.7"],
        "dev": [
            "pytest",
            "pytest-timeout",
            "matplotlib",
            "transformers>=4.40",
            "safetensors",
            "tensorboard",
            "flashlight-text>=0.0.7",
            "hydra-submitit-launcher>=1.2",
            # pinned: `make test` checks the formatting, which must not move between releases
            "ruff==0.16.9",
        ],
        # SLURM launches through configs/run_config/slurm_*.yaml (hydra's submitit launcher) and
        # knnvq-study --launcher slurm (submitit; checked with hydra-submitit-launcher 1.2.0, submitit 1.5.4).
        "slurm": ["hydra-submitit-launcher>=1.2"],
    },
    entry_points={
        "console_scripts": [
            "knnvq-manifest = fairseq_knnvq.cli.manifest:main",
            "knnvq-prepare-librispeech = fairseq_knnvq.cli.prepare_librispeech:main",
            "knnvq-infer = fairseq_knnvq.cli.infer_ctc:main",
            "knnvq-ngram-lm = fairseq_knnvq.cli.ngram_lm:main",
            "knnvq-wer-table = fairseq_knnvq.cli.wer_table:main",
            "knnvq-report = fairseq_knnvq.cli.report:main",
            "knnvq-eval-image = fairseq_knnvq.cli.eval_image:main",
            "knnvq-export-hf = fairseq_knnvq.cli.export_hf:main",
            "knnvq-train = fairseq_knnvq.cli.train:main",
            "knnvq-study = fairseq_knnvq.cli.study:main",
        ],
    },
)
