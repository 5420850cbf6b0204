
import sys
import pytest

def test_declared_but_missing():
    sys.modules["onnx"] = None  # `import onnx` now raises ImportError
    pytest.importorskip("onnx")

def test_undeclared_and_missing():
    pytest.importorskip("surely_not_a_module_here")

def test_no_cuda():
    pytest.skip("needs a CUDA device")
