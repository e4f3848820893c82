"""Write a trained checkpoint as a Hugging Face Llama folder: the model leaves this code for the usual tools.

    python llm/export.py --checkpoint runs/llm/best.pt --out runs/llm/hf

The folder holds config.json, model.safetensors, generation_config.json, tokenizer.json (+ tokenizer_config.json)
and the SentencePiece tokenizer.model. transformers loads it with no custom code:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("runs/llm/hf")
    tokenizer = AutoTokenizer.from_pretrained("runs/llm/hf")

and llama.cpp's convert_hf_to_gguf.py turns it into a GGUF file.
"""

import argparse
import sys
from pathlib import Path

from llm.chat_model import gguf_tokenizer_of
from llm.checkpoint import load_model, saved_tokenizer
from llm.hf import export_hf, write_hf_folder


def export_with_gguf_tokenizer(model, tokenizer, out: Path) -> Path:
    """A Hugging Face folder for a model fine-tuned from a GGUF file: the weights as export_hf writes them, the
    GGUF's byte-level BPE as tokenizer.json, and the chat template in tokenizer_config.json."""
    special = tokenizer.special_tokens
    names = [name for name in ("bos_token", "eos_token", "unk_token", "pad_token") if name in special]
    settings = {"chat_template": tokenizer.chat_template, **{name: special[name] for name in names}}
    return write_hf_folder(model, out, tokenizer.eos_id(), getattr(tokenizer, "bos", None),
                           lambda folder: tokenizer.tokenizer.save(str(folder / "tokenizer.json")), settings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/llm/best.pt",
                        help="checkpoint written by llm/train.py (or model.pt of llm/sft.py / llm/dpo.py)")
    parser.add_argument("--out", required=True, help="folder to write (it must not exist, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args()
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
        model, checkpoint = load_model(args.checkpoint, "cpu")
        if checkpoint.get("tokenizer_gguf"):  # fine-tuned from a GGUF model: its byte-level BPE goes along
            export_with_gguf_tokenizer(model, gguf_tokenizer_of(checkpoint, args.checkpoint), out)
            print(f"wrote {out}: config.json, model.safetensors ({model.num_parameters():,} parameters, float32), "
                  f"tokenizer.json with the chat template")
            return
        export_hf(model, saved_tokenizer(checkpoint), out)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        sys.exit(f"error: {error}")
    print(f"wrote {out}: config.json, model.safetensors ({model.num_parameters():,} parameters, float32), "
          f"tokenizer.json, tokenizer.model")


if __name__ == "__main__":
    main()
