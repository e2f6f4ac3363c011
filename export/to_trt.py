"""ckpt.pt -> fvq.engine: python export/to_trt.py ckpt.pt [-o fvq.engine] [--precision fp16] [--batch 1:8:32]"""

from cli import main

if __name__ == "__main__":
    main(onnx_only=False)
