"""The jobs' configs, built from the sections in `adapter/settings.py` (the one config system).

A training YAML holds every section; the preprocessing job reads the same file and uses its
`model` (the tokenizer, and the context the data must fit) and `data` sections, so both jobs see
one set of facts. Each job saves its resolved config beside its outputs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from adapter.backbones.adapted import EncoderAdapterConfig
from adapter.backbones.vit import ViTShape
from adapter.decoding import SamplingParams
from adapter.image_encoder import VisionConfig
from adapter.settings import ModelConfig, PathField, Section


class DataConfig(Section):
    source: str = PathField(
        description="JSON (array or lines) / parquet records: a file, a folder, a glob or a "
        "pyarrow URI (s3://...), or an http(s)/file URL of one file"
    )
    sha256: str | None = Field(None, description="expected sha256 of the source (one file only)")
    download: str | None = Field(
        None, description="an http(s) URL to fetch the file from when `source` does not exist (checked by sha256)"
    )
    out: str = PathField(description="folder for parquet shards, stats.json and rejects.jsonl")
    max_seq_len: int = Field(512, ge=8, description="records are cut to this many tokens")
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="use only the first N records (a quick subset)")
    max_record_bytes: int = Field(1 << 20, ge=1024, description="a longer record (JSON text) is rejected unread")


class RaySection(Section):
    num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of a local Ray started by this job (ignored when a cluster is running)"
    )
    verbose: bool = Field(False, description="show Ray's own logs and progress bars on the console")


class OptimConfig(Section):
    recipe: Literal["script", "paper", "custom"] = Field(
        "script",
        description="script: lr = blr x global batch / 256 (authors' code); paper: lr = blr (absolute, "
        "the paper's batch 64); custom: lr",
    )
    blr: float = Field(9e-3, gt=0)
    lr: float | None = Field(None, gt=0, description="absolute learning rate (recipe 'custom')")
    min_lr: float = 0.0
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    epochs: float = Field(5, gt=0)
    warmup_epochs: float = Field(2, ge=0)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    group_by_length: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _custom_needs_lr(self):
        if self.recipe == "custom" and self.lr is None:
            raise ValueError("optim.recipe 'custom' needs optim.lr")
        return self

    def peak_lr(self, world_size: int) -> float:
        if self.recipe == "custom":
            return self.lr
        if self.recipe == "paper":
            return self.blr
        return self.blr * self.micro_batch_size * self.grad_accum_steps * world_size / 256


class WorkersConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="leave CPUs for Ray Data on shared clusters")
    gpus_per_worker: float = 1.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    peak_tflops: float | None = Field(
        None, gt=0, description="per-device peak for MFU; default: looked up from the GPU's name"
    )


class CheckpointConfig(Section):
    every_n_steps: int | None = Field(None, ge=1)
    keep: int = Field(2, ge=1, description="best k checkpoints kept, by held-out loss")
    resume_from: str | None = PathField(
        None,
        description="a checkpoint folder to start from (a TRUSTED folder: DeepSpeed unpickles its optimizer state)",
    )
    max_failures: int = Field(1, ge=0)


class SamplesConfig(Section):
    """Fixed instructions answered at step 0 and every epoch end: the run's before/after."""

    instructions: list[str] = [
        "Tell me about alpacas.",
        "Write a short story about a dog who finds a ball.",
        "List three tips for staying healthy.",
    ]
    sampling: SamplingParams = SamplingParams(max_gen_len=48, temperature=0.0)


class ScienceQAData(Section):
    """ScienceQA in its official layout under `data.source`: problems.json, pid_splits.json and
    images/<split>/<pid>/image.png. Training uses the official train split, held-out loss its val split."""

    images: str | None = PathField(None, description="folder holding <split>/<pid>/image.png (default <source>/images)")
    captions: str | None = PathField(
        None, description="ScienceQA's captions.json: an image problem's caption joins its context (text baselines)"
    )
    answer_parser: Literal["standard", "lenient"] = Field(
        "standard", description="standard: exactly one 'The answer is (X)', X upper-case (mm-cot's); lenient: any case"
    )
    missing_image: Literal["reject", "text_only"] = Field(
        "reject", description="a problem whose image file is absent: set aside (reject) or used without it"
    )


class CocoData(Section):
    """COCO Caption: captions_*.json-style annotations and image folders, relative to `data.source`.
    With a Karpathy split file (dataset_coco.json) its train+restval / val / test splits are used."""

    train_captions: str = "annotations/captions_train2017.json"
    train_images: str = "train2017"
    val_captions: str = "annotations/captions_val2017.json"
    val_images: str = "val2017"
    karpathy_split: str | None = Field(None, description="dataset_coco.json; images then under <source>/<filepath>")
    instruction: str = "Generate a caption for this image."


class SquadSplit(Section):
    """Which SQuAD questions train and which are scored (task squad, docs/encoders.md). By default
    the training file's questions are split by a hash of their id (`data.val_fraction`, for
    held-out loss) and the evaluation job scores `encoder.eval_source` whole. With
    `held_out_articles` one file (data.source = encoder.eval_source, e.g. the dev set when it is
    the only real SQuAD at hand) is cut BY ARTICLE: the records hold only the training articles'
    questions, the evaluation scores only the held-out articles', and both record the titles.
    That is a split of one file, not the official train / dev protocol, and reports say so."""

    held_out_articles: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of the articles held out for evaluation (0: no split by article)"
    )
    split_seed: int = Field(0, description="seed of the article split (a shuffle of the sorted titles)")


class EvalConfig(Section):
    """Batch inference of `pipelines.evaluate` (greedy generation for the LLaMA tasks)."""

    adapter: str | None = PathField(None, description="adapter file or folder (default <output_dir>/<name>/adapter)")
    split: str = Field("test", description="ScienceQA: train / val / test; COCO: val (or Karpathy's val / test)")
    out: str | None = PathField(None, description="results folder (default <output_dir>/<name>/eval-<task>-<split>)")
    limit: int | None = Field(None, ge=1, description="only the first N problems / images")
    batch_size: int = Field(8, ge=1)
    actors: int = Field(1, ge=1, description="model replicas in the Ray Data actor pool")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    max_gen_len: int = Field(24, ge=1)


class BackboneSection(Section):
    """Zero-init prompts on a frozen ViT (task image-classification) or BERT-family encoder (task
    squad), docs/encoders.md. Held-out data: the image folder's val/ split (else a hash split of
    train/ by data.val_fraction); for SQuAD a hash split of the training questions (and, with
    `squad.held_out_articles`, whole articles held out for evaluation)."""

    weights: str = PathField(
        model_name=True,
        description="image-classification: a torchvision ViT state dict (.safetensors, or .pth "
        "read with weights_only); squad: a transformers BertModel / RobertaModel folder "
        "(config.json model_type bert / roberta, model.safetensors) with its fast tokenizer, or a "
        "catalogue model (all-MiniLM-L6-v2)",
    )
    vit: ViTShape = Field(ViTShape.vit_b_16(), description="the ViT's shape (image-classification)")
    adapter: EncoderAdapterConfig = EncoderAdapterConfig()
    doc_stride: int = Field(128, ge=1, description="SQuAD: overlap of consecutive windows of a long context")
    max_answer_len: int = Field(30, ge=1, description="SQuAD: longest answer span, in tokens")
    null_threshold: float = Field(
        0.0, description="SQuAD v2.0: answer '' when the no-answer score beats the best span by more than this"
    )
    eval_source: str | None = PathField(
        None,
        description="what the evaluation job scores: an image folder split "
        "(default <data.source>/test, else val) or a SQuAD dev file",
    )


class PreprocessConfig(Section):
    # Which task's data the job builds: a name from the task registry (pipelines/tasks/__init__.py),
    # checked there with the list of known names; each task also checks the sections it needs.
    task: str = "alpaca"
    model: ModelConfig | None = Field(None, description="the LLaMA base (tasks of the llama family)")
    data: DataConfig
    ray: RaySection = RaySection()
    encoder: BackboneSection | None = Field(None, description="the backbone of tasks of the backbone family")


class TrainConfig(PreprocessConfig):
    name: str = "adapter-run"
    # Multimodal (docs/multimodal.md): the frozen image encoder and the sets' own settings.
    vision: VisionConfig | None = None
    scienceqa: ScienceQAData = ScienceQAData()
    coco: CocoData = CocoData()
    squad: SquadSplit = SquadSplit()
    evaluation: EvalConfig = EvalConfig()
    output_dir: str = PathField("runs")
    optim: OptimConfig = OptimConfig()
    workers: WorkersConfig = WorkersConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    samples: SamplesConfig = SamplesConfig()
    fail_at_step: int | None = Field(None, description="fault injection: a worker dies once at this step")
    stop_at_step: int | None = Field(None, ge=1, description="end early after this step (schedule unchanged)")

    @model_validator(mode="after")
    def _needs_held_out(self):
        if self.data.val_fraction <= 0:
            raise ValueError(
                "training needs a held-out split (data.val_fraction > 0): checkpoints are ranked by held-out loss"
            )
        return self


def preprocess_part(cfg: TrainConfig) -> PreprocessConfig:
    return PreprocessConfig(task=cfg.task, model=cfg.model, data=cfg.data, ray=cfg.ray, encoder=cfg.encoder)
