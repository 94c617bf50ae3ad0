"""`python -m veil_standins`: the LOCAL STAND-INS for Azure (see main.py)."""

from veil_standins.main import main

if __name__ == "__main__":
    raise SystemExit(main())
