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

from llm.checkpoint import load_model, saved_tokenizer
from llm.hf import export_hf


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/llm/best.pt", help="checkpoint written by llm/train.py")
    parser.add_argument("--out", required=True, help="folder to write (it must not exist, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args()
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
        model, checkpoint = load_model(args.checkpoint, "cpu")
        export_hf(model, saved_tokenizer(checkpoint), out)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        sys.exit(f"error: {error}")
    print(f"wrote {out}: config.json, model.safetensors ({model.num_parameters():,} parameters, float32), "
          f"tokenizer.json, tokenizer.model")


if __name__ == "__main__":
    main()
