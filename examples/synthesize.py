#!/usr/bin/env python
"""Generate a labelled synthetic dataset with the public model and (optionally) a DP LoRA adapter.

A thin command line over `peft_dp_saliency.commands.synthesize` (`--help` lists every flag).
"""

from peft_dp_saliency.commands.synthesize import main

if __name__ == "__main__":
    main()
