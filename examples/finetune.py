"""Fine-tune a timm model on noisily labelled images with MLNT.

    accelerate launch examples/finetune.py                 # offline MNIST, 40% symmetric noise
    accelerate launch examples/finetune.py --no-meta       # the cross-entropy baseline
    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py
    accelerate launch examples/finetune.py --dataset path/to/imagefolder --model resnet50 --pretrained

The whole run (data, Accelerate, the MLNT wrapper, checkpoints, progress) lives in
`noisy_meta.finetune.trainer`; `--help` lists every flag.
"""

from noisy_meta.finetune import run_command

if __name__ == "__main__":
    run_command()
