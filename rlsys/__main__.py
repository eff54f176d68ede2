from rlsys.cli import main

# Guarded: process pools started with spawn/forkserver re-import the main module.
if __name__ == "__main__":
    raise SystemExit(main())
