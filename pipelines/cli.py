def main() -> None:
    raise SystemExit("lvita: no commands yet")
