#!/usr/bin/env python
"""Empirical privacy audit of DP-SAPF: insert canaries, train with the real script, attack, bound epsilon.

A thin command line over `peft_dp_saliency.commands.audit` (`--help` lists every flag).
"""

from peft_dp_saliency.commands.audit import main

if __name__ == "__main__":
    main()
