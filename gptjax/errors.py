"""The exception types users see: bad input, reported as a single line, and a preempted
multi-process job."""


class GptjaxError(ValueError):
    """A problem with the user's input or files; the CLI prints it and exits with 2."""


class Preempted(KeyboardInterrupt):
    """A multi-process job stopped where JAX's preemption service had every process agree
    to stop (a SIGTERM reached one of them); like Ctrl-C, the state there is saved."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step
