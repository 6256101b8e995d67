"""``python -m soce.collect dir=<sweep dir>``: the final step of a spread-out weight search (see soce.sweep)."""

from soce.sweep import collect_main

if __name__ == "__main__":
    raise SystemExit(collect_main())
