"""Fixtures for the runtime tests: real models, real keys, real HTTP servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from onnx import TensorProto, helper, numpy_helper

from veil.runtime.jwk import rsa_private_jwk

from .doubles import (
    SidecarDouble,
    TestAuthority,
    TrainedModel,
    running,
    train_breast_cancer_model,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def model_key() -> rsa.RSAPrivateKey:
    """Stands for the exportable Key Vault HSM key a model is sealed to."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def breast_cancer_model() -> TrainedModel:
    """A real classifier: scikit-learn's bundled breast-cancer data, converted with skl2onnx."""
    return train_breast_cancer_model()


@pytest.fixture(scope="session")
def mlp_model() -> bytes:
    """A two-layer MLP (MatMul/Add/Relu) built with onnx.helper: x[batch, 4] -> y[batch, 3]."""
    rng = np.random.default_rng(7)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
        helper.make_node("Add", ["y0", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@pytest.fixture
def sidecar_double(model_key: rsa.RSAPrivateKey) -> SidecarDouble:
    return SidecarDouble(released_jwk=rsa_private_jwk(model_key))


@pytest.fixture(scope="session")
def authority_keys() -> dict[str, rsa.RSAPrivateKey]:
    return {
        "x5c-key": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ne-key": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture
async def authority(authority_keys: dict[str, rsa.RSAPrivateKey]) -> AsyncIterator[TestAuthority]:
    double = TestAuthority(signing_keys=authority_keys)
    async with running(double.app()) as url:
        double.issuer = url
        yield double


@pytest.fixture
async def rogue_authority(other_key: rsa.RSAPrivateKey) -> AsyncIterator[TestAuthority]:
    """An attacker's authority: its own key under the kid the real authority uses."""
    double = TestAuthority(signing_keys={"x5c-key": other_key})
    async with running(double.app()) as url:
        double.issuer = url
        yield double
