"""Chat with a trained model: ``python -m lavis.chat --ckpt outputs/sft [--image a.png] [--query "..."]``.

With ``--query`` it answers once and exits (one-shot); otherwise it reads queries from the terminal.
Interactive commands: ``:image PATH`` attaches a picture to the next query, ``:draw PATH`` saves the
last response's boxes drawn on its picture, ``:clear`` starts over, ``:quit`` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lavis.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a run's output_dir, or a checkpoint directory / weights file in it")
    parser.add_argument("--query", help="answer this one query and exit")
    parser.add_argument("--image", action="append", default=[], help="picture(s) for the (first) query; repeatable")
    parser.add_argument("--draw", help="save the response's boxes drawn on the (last) picture to this PNG")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def build_query(text: str, images: list[str]) -> list[dict[str, Any]]:
    return [*({"image": path} for path in images), {"text": text}]


class ChatSession:
    """A conversation with one model: its history and the pictures seen so far."""

    def __init__(self, model, max_new_tokens: int, num_beams: int) -> None:
        self.model = model
        self.options = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        self.history: list[tuple[str, str]] = []
        self.images: list[str] = []

    def ask(self, text: str, images: list[str]) -> str:
        for path in images:
            if not Path(path).is_file():
                raise FileNotFoundError(f"image not found: {path}")
        response, self.history = self.model.chat(build_query(text, images), self.history, **self.options)
        self.images += images
        return response

    def draw(self, out_path: str) -> Path | None:
        """The last response's boxes on the last picture, saved as PNG; None without a picture or a response."""
        from lavis.serving.boxes import draw_boxes

        if not self.images or not self.history:
            return None
        draw_boxes(self.images[-1], self.history[-1][1], out_path)
        return Path(out_path)


def interactive(session: ChatSession, images: list[str]) -> None:
    pending = list(images)
    print("Type a query; :image PATH attaches a picture, :draw PATH saves boxes, :clear, :quit.", file=sys.stderr)
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command == ":quit":
            return
        if command == ":clear":
            session.history, session.images, pending = [], [], []
            print("(history cleared)", file=sys.stderr)
        elif command == ":image":
            if Path(arg.strip()).is_file():
                pending.append(arg.strip())
            else:
                print(f"image not found: {arg.strip()}", file=sys.stderr)
        elif command == ":draw":
            saved = session.draw(arg.strip() or "boxes.png")
            print(f"saved {saved}" if saved else "(nothing to draw: no picture or response yet)", file=sys.stderr)
        else:
            try:
                print(f"assistant> {session.ask(line, pending)}")
            except (FileNotFoundError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
            pending = []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lavis.tracking.logging import setup_logging

    setup_logging()
    import lavis

    try:
        model, _ = lavis.load_model(args.ckpt, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT
    session = ChatSession(model, args.max_new_tokens, args.num_beams)
    if args.query is None:
        interactive(session, args.image)
        return 0
    try:
        print(session.ask(args.query, args.image))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT
    if args.draw:
        saved = session.draw(args.draw)
        print(f"saved {saved}" if saved else "nothing drawn: no picture", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
