#!/usr/bin/env python
"""DP-SAPF: differentially private saliency-aware LoRA fine-tuning of a text-to-image model.

    accelerate launch examples/train_dp_sapf.py --target_epsilon 10 --output_dir dp-sapf-fmnist

A thin command line over `peft_dp_saliency.train` (`--help` lists every flag).
"""

from peft_dp_saliency.train import main

if __name__ == "__main__":
    main()
