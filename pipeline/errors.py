"""Errors that stop a run on purpose, with a message that says what happened and what to do next (the CLI
prints it without a traceback). Kept free of heavy imports: the CLI catches them before torch is loaded."""


class RunStopped(RuntimeError):
    """Training stopped itself: the message names the cause, the steps or files involved, and the way on."""
