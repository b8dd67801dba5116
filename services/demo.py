"""`make run`: starts the stack, streams one chat completion through it, keeps serving
until Ctrl-C."""

import subprocess
import sys

DEMO_PROMPT = "Write a haiku about paged memory."


def main() -> int:
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve"], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None, "started with stdout=PIPE"
    try:
        for line in server.stdout:
            print(line, end="", flush=True)
            if line.startswith("pagedserve serving on port"):
                break
        else:
            return server.wait() or 1
        print(f"\n> {DEMO_PROMPT}\n", flush=True)
        subprocess.run([sys.executable, "-m", "services.cli", "generate", "--chat", DEMO_PROMPT], check=False)
        print(
            '\nThe server keeps running on localhost:50051; try `.venv/bin/pagedserve generate "Hello"`. '
            "Ctrl-C stops it.",
            flush=True,
        )
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return server.wait()


if __name__ == "__main__":
    sys.exit(main())
