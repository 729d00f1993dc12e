"""Malicious pickles for the tests: loading one with plain pickle runs `touch MARKER`."""
import os


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
