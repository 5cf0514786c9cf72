#!/usr/bin/env python
"""Evaluate a synthetic labelled dataset against the real test split.

A thin command line over `peft_dp_saliency.commands.evaluate` (`--help` lists every flag).
"""

from peft_dp_saliency.commands.evaluate import main

if __name__ == "__main__":
    main()
