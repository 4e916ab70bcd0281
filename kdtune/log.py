"""One line of progress on the terminal, prefixed so it stands out from Ray's and MLflow's."""


def log(message: str) -> None:
    print(f"kdtune: {message}", flush=True)
