"""The command lines besides training (``peft_dp_saliency.train``): each module has ``main(argv=None)``.

    python -m peft_dp_saliency.commands.synthesize --help   # = examples/synthesize.py
    python -m peft_dp_saliency.commands.evaluate --help     # = examples/evaluate.py
    python -m peft_dp_saliency.commands.audit --help        # = examples/audit.py
"""
