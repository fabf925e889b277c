"""The one base class of Negatron's user-facing errors.

Every error that means "your input, your files or your cluster are not as they must be" derives
from ``NegatronError`` (and from the built-in class it always had, so ``except ValueError`` in
user code keeps working). The CLI catches ``NegatronError`` and prints its message in one line;
anything else is a bug and keeps its traceback.
"""


class NegatronError(Exception):
    """A problem the user can fix; its message names it in one line (or one line per bad key)."""
