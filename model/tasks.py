"""The task prompts (DeepSeek-OCR's wording) shared by training data, evaluation and Serve."""

TASK_PROMPTS: dict[str, str] = {
    "markdown": "<image>\n<|grounding|>Convert the document to markdown.",
    "grounding": "<image>\n<|grounding|>Convert the document to markdown.",
    "free": "<image>\nFree OCR.",
    "figure": "<image>\nParse the figure.",
    "describe": "<image>\nDescribe this image in detail.",
}

GROUNDING_TASKS = frozenset({"markdown", "grounding"})


def prompt_for(task: str) -> str:
    """The prompt of a named task; a clear error names the known ones."""
    try:
        return TASK_PROMPTS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASK_PROMPTS)}") from None
