"""python -m onnxadmm ..."""

from .cli import main

raise SystemExit(main())
