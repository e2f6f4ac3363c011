"""ckpt.pt -> encoder.onnx, decoder.onnx, codebook.npy: python export/to_onnx.py ckpt.pt [-o DIR]"""

from cli import main

if __name__ == "__main__":
    main(onnx_only=True)
