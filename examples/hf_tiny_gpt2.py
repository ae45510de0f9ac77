"""Train a tiny GPT-2 with the Hugging Face Trainer, DyT in place of LayerNorm, DAG and loss-driven lr control.

The loss-driven controller (``autonomic``) turns the learning-rate dial ``lr_scale``. Offline: the model
comes from a config, the text is Python's own documentation (``ponder.data.embedded_corpus``) read as bytes, so
there is no tokenizer to fetch.

    python examples/hf_tiny_gpt2.py [--steps 1500] [--out examples/output/hf_tiny_gpt2] [--no-progress]

Needs ``pip install 'ponder[hf]'``. Writes the trained model (``save_pretrained``) and ``hf_tiny_gpt2.json``
(the losses, the dial's path) into ``--out``, then reloads the model with ``ponder.hf.from_pretrained`` to show
that the DyT layers survive the round trip, where plain ``AutoModelForCausalLM.from_pretrained`` would rebuild
GPT-2's LayerNorms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in this example may reach the hub

DEFAULT_OUT = Path(__file__).parent / "output" / "hf_tiny_gpt2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the model and the summary")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64, help="bytes per training window")
    parser.add_argument("--lr", type=float, default=1e-2, help="DAG's learning rate (the dial multiplies it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar and no per-log lines")
    return parser.parse_args(argv)


def windows(ids, seq_len: int, limit: int | None = None):
    """Non-overlapping byte windows as causal-LM examples (the model shifts the labels itself)."""
    import torch

    n = (len(ids) // seq_len) if limit is None else min(limit, len(ids) // seq_len)
    rows = ids[: n * seq_len].view(n, seq_len)

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": rows[i], "labels": rows[i]}

    return Windows()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import transformers
        from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
    except ImportError:
        raise SystemExit("this example needs Hugging Face transformers: pip install 'ponder[hf]'") from None
    import torch

    from ponder import hf
    from ponder.config import DataConfig
    from ponder.data import ByteTokenizer, prepare_data
    from ponder.plugins.control.autonomic import Autonomic

    transformers.logging.set_verbosity_error()
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    corpus = prepare_data(DataConfig(source="embedded", tokenizer="byte"))
    train_set = windows(corpus.splits["train"], args.seq_len)
    valid_set = windows(corpus.splits["valid"], args.seq_len, limit=128)
    newline = ord("\n")
    config = GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=newline, eos_token_id=newline, pad_token_id=newline)
    model = GPT2LMHeadModel(config)
    replaced = hf.convert_pretrained(model, to="dyt", source="layernorm", alpha_init_value=0.5)
    print(f"DyT: replaced {replaced} LayerNorm layers in a {config.n_layer}-layer GPT-2 "
          f"({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters)")

    optimizer = hf.make_optimizer(model, "dag", lr=args.lr)
    dial = {"min": 0.5, "max": 2.0, "factor": 1.01, "threshold": 0.02}
    callback = hf.PonderCallback([Autonomic(beta=0.9, dials={"lr_scale": dial}, log_every=0)])
    training = TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20), max_grad_norm=1.0, logging_steps=max(1, args.steps // 20),
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=args.no_progress, seed=args.seed,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training, train_dataset=train_set, eval_dataset=valid_set,
                      optimizers=(optimizer, None), callbacks=[callback])
    if args.no_progress:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)

    before = trainer.evaluate()["eval_loss"]
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    after = trainer.evaluate()["eval_loss"]
    path = [r["dial/lr_scale"] for r in trainer.state.log_history if "dial/lr_scale" in r and "loss" in r]
    print(f"trained {args.steps} steps in {seconds:.1f} s with DAG (lr {args.lr:g}) and autonomic on lr_scale")
    print(f"validation loss: {before:.3f} before, {after:.3f} after (perplexity {math.exp(after):.2f})")
    print(f"lr_scale: 1 at the start, {min(path):.3f} to {max(path):.3f} over the logs, "
          f"{callback.dials.value('lr_scale'):.3f} at the end")

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "model"
    model.save_pretrained(model_dir)
    reloaded = hf.from_pretrained(model_dir)
    probe = valid_set[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        same = torch.equal(reloaded(probe).logits, model(probe).logits)
    norm_class = type(reloaded.transformer.h[0].ln_1).__name__
    plain_class = type(AutoModelForCausalLM.from_pretrained(model_dir).transformer.h[0].ln_1).__name__
    print(f"reloaded with ponder.hf.from_pretrained: ln_1 is {norm_class}, logits identical: {same} "
          f"(plain AutoModelForCausalLM.from_pretrained gives {plain_class})")

    prompt = ByteTokenizer().encode("The ")[None]
    sample = reloaded.generate(prompt, max_new_tokens=48, do_sample=False)
    text = ByteTokenizer().decode(sample[0]).replace("\n", " ")
    print(f"greedy sample: {text!r}")

    summary = {"steps": args.steps, "seconds": seconds, "replaced": replaced, "eval_loss_before": before,
               "eval_loss_after": after, "lr_scale_logged": path, "lr_scale_final": callback.dials.value("lr_scale"),
               "reloaded_norm": norm_class, "plain_norm": plain_class, "identical_logits": same, "sample": text}
    (args.out / "hf_tiny_gpt2.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
