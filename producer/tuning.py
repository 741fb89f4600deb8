"""`finetune`, `jobs` and `ask`: placeholder until the fine-tune step lands."""


def add_commands(commands) -> None:
    return None
