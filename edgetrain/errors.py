"""Errors a user can fix. The CLI prints these as one clean message, never a traceback."""


class UserInputError(ValueError):
    """Bad input from the user: a flag value, a file or a folder.

    The message names the flag or file and says what to do about it. Several problems found
    at once are joined into one message so the user can fix them all in one go.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(f"- {p}" for p in self.problems) if len(self.problems) > 1
                         else self.problems[0])
