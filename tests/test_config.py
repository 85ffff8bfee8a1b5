"""GPTConfig presets and validation; typed overrides, dict and TOML loading (gpt2lab.config)."""

from __future__ import annotations

import dataclasses

import pytest

from gpt2lab import GPTConfig, UserError
from gpt2lab.config import (
    GPT2_PADDED_VOCAB_SIZE,
    GPT2_VOCAB_SIZE,
    MODEL_PRESETS,
    apply_overrides,
    coerce,
    from_dict,
    load_toml,
    to_toml,
)

# ---- presets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, n_layer, n_head, n_embd",
    [
        ("gpt2", 12, 12, 768),
        ("gpt2-medium", 24, 16, 1024),
        ("gpt2-large", 36, 20, 1280),
        ("gpt2-xl", 48, 25, 1600),
    ],
)
def test_presets_have_openai_shapes(name, n_layer, n_head, n_embd):
    config = GPTConfig.from_preset(name)
    assert (config.n_layer, config.n_head, config.n_embd) == (n_layer, n_head, n_embd)
    assert config.block_size == 1024
    assert config.vocab_size == 50257 == GPT2_VOCAB_SIZE
    assert config.padded_vocab_size is None
    assert config.embedding_rows == 50257
    assert config.head_dim == n_embd // n_head == 64
    assert config.bias is True and config.tie_embeddings is True
    assert config.layer_norm_epsilon == 1e-5
    assert config.dropout == 0.0


def test_preset_names():
    assert list(MODEL_PRESETS) == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]


def test_default_config_is_gpt2_small():
    assert GPTConfig() == GPTConfig.from_preset("gpt2")


def test_preset_overrides_return_a_copy_and_leave_the_preset_alone():
    config = GPTConfig.from_preset("gpt2", padded_vocab_size=GPT2_PADDED_VOCAB_SIZE, dropout=0.1)
    assert config.padded_vocab_size == 50304
    assert config.embedding_rows == 50304
    assert config.dropout == 0.1
    assert MODEL_PRESETS["gpt2"].padded_vocab_size is None
    assert MODEL_PRESETS["gpt2"].dropout == 0.0


def test_preset_overrides_are_validated():
    with pytest.raises(UserError, match="n_embd"):
        GPTConfig.from_preset("gpt2", n_embd=100)


def test_unknown_preset_names_it_and_the_choices():
    with pytest.raises(UserError) as info:
        GPTConfig.from_preset("gpt3")
    message = str(info.value)
    assert "'gpt3'" in message
    assert "gpt2-medium" in message


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(n_embd=100, n_head=12), "n_embd"),
        (dict(n_layer=-1), "n_layer"),
        (dict(n_layer=0), "n_layer"),
        (dict(n_head=0), "n_head"),
        (dict(block_size=-5), "block_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=True), "n_layer"),
        (dict(n_layer=2.0), "n_layer"),
        (dict(vocab_size=100, padded_vocab_size=99), "padded_vocab_size"),
        (dict(padded_vocab_size=50000), "padded_vocab_size"),
        (dict(dropout=1.5), "dropout"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout=float("nan")), "dropout"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
        (dict(attention="foo"), "attention"),
    ],
)
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(UserError) as info:
        GPTConfig(**kwargs)
    assert f"model.{key}" in str(info.value)


def test_divisibility_message_names_both_values():
    with pytest.raises(UserError) as info:
        GPTConfig(n_embd=100, n_head=12)
    assert "100" in str(info.value) and "12" in str(info.value) and "n_head" in str(info.value)


def test_attention_message_lists_choices():
    with pytest.raises(UserError) as info:
        GPTConfig(attention="foo")
    assert "'foo'" in str(info.value) and "sdpa" in str(info.value) and "plain" in str(info.value)


def test_valid_edge_values_are_accepted():
    config = GPTConfig(n_layer=1, n_head=1, n_embd=1, block_size=1, vocab_size=1, padded_vocab_size=1)
    assert config.embedding_rows == 1
    assert GPTConfig(dropout=0.0).dropout == 0.0
    assert GPTConfig(dropout=0.999).dropout == 0.999
    assert GPTConfig(attention="plain").attention == "plain"


def test_replace_revalidates():
    with pytest.raises(UserError, match="model.n_layer"):
        dataclasses.replace(GPTConfig(), n_layer=0)


# ---- overrides ---------------------------------------------------------------------------------


def test_overrides_coerce_strings_to_field_types():
    config = apply_overrides(
        GPTConfig(),
        [
            "n_layer=4",
            "bias=false",
            "padded_vocab_size=none",
            "dropout=0.25",
            "tie_embeddings=False",
            "attention=plain",
            "block_size = 256",
            "vocab_size=50_257",
        ],
    )
    assert config.n_layer == 4 and type(config.n_layer) is int
    assert config.bias is False
    assert config.padded_vocab_size is None
    assert config.dropout == 0.25 and type(config.dropout) is float
    assert config.tie_embeddings is False
    assert config.attention == "plain"
    assert config.block_size == 256
    assert config.vocab_size == 50257


def test_overrides_apply_in_order_and_do_not_mutate():
    base = GPTConfig()
    config = apply_overrides(base, ["padded_vocab_size=50304", "n_layer=2", "n_layer=3"])
    assert config.padded_vocab_size == 50304 and type(config.padded_vocab_size) is int
    assert config.n_layer == 3
    assert base.n_layer == 12 and base.padded_vocab_size is None
    assert apply_overrides(config, ["padded_vocab_size=null"]).padded_vocab_size is None


@pytest.mark.parametrize("text, expected", [("true", True), ("1", True), ("yes", True), ("ON", True),
                                            ("False", False), ("0", False), ("no", False), ("off", False)])
def test_bool_spellings(text, expected):
    assert apply_overrides(GPTConfig(), [f"bias={text}"]).bias is expected


def test_unknown_override_key_is_refused_by_name():
    with pytest.raises(UserError) as info:
        apply_overrides(GPTConfig(), ["n_layers=4"])
    assert "'n_layers'" in str(info.value)
    assert "n_layer" in str(info.value)  # lists the known settings


@pytest.mark.parametrize(
    "override, key",
    [
        ("n_layer=abc", "n_layer"),
        ("n_layer=4.5", "n_layer"),
        ("n_layer=true", "n_layer"),
        ("n_layer=none", "n_layer"),
        ("bias=maybe", "bias"),
        ("dropout=abc", "dropout"),
        ("padded_vocab_size=lots", "padded_vocab_size"),
    ],
)
def test_wrong_type_is_refused_naming_the_key(override, key):
    with pytest.raises(UserError) as info:
        apply_overrides(GPTConfig(), [override])
    assert key in str(info.value)


@pytest.mark.parametrize("override, key", [("n_embd=100", "n_embd"), ("dropout=1.5", "dropout"),
                                           ("attention=foo", "attention"), ("n_layer=-1", "n_layer"),
                                           ("padded_vocab_size=10", "padded_vocab_size")])
def test_override_values_are_validated(override, key):
    with pytest.raises(UserError, match=f"model.{key}"):
        apply_overrides(GPTConfig(), [override])


@pytest.mark.parametrize("override", ["n_layer", "=4", " =4", ""])
def test_malformed_override(override):
    with pytest.raises(UserError, match="key=value"):
        apply_overrides(GPTConfig(), [override])


def test_dotted_override_into_a_non_table_is_refused():
    with pytest.raises(UserError, match="n_layer"):
        apply_overrides(GPTConfig(), ["n_layer.x=1"])


def test_nested_dataclass_overrides():
    @dataclasses.dataclass
    class Outer:
        model: GPTConfig = dataclasses.field(default_factory=GPTConfig)
        steps: int = 10

    outer = apply_overrides(Outer(), ["model.n_layer=2", "steps=5", "model.bias=off"])
    assert outer.model.n_layer == 2 and outer.model.bias is False and outer.steps == 5
    with pytest.raises(UserError) as info:
        apply_overrides(Outer(), ["model.nope=1"])
    assert "model.nope" in str(info.value)


def test_coerce_edge_cases():
    assert coerce("1e3", int, where="x") == 1000
    assert coerce(3.0, int, where="x") == 3
    assert coerce(3, float, where="x") == 3.0 and type(coerce(3, float, where="x")) is float
    with pytest.raises(UserError, match="x must be an integer"):
        coerce(True, int, where="x")
    with pytest.raises(UserError, match="x must be a number"):
        coerce(False, float, where="x")
    with pytest.raises(UserError, match="x must be a string"):
        coerce(3, str, where="x")
    assert coerce("a, b", list[str], where="x") == ["a", "b"]
    assert coerce("1,2", tuple[int, int], where="x") == (1, 2)
    with pytest.raises(UserError, match="2 items"):
        coerce("1,2,3", tuple[int, int], where="x")


# ---- from_dict -----------------------------------------------------------------------------------


def test_from_dict_coerces_and_builds():
    config = GPTConfig.from_dict({"n_layer": "4", "n_head": 2, "n_embd": 64, "bias": "false",
                                  "padded_vocab_size": "none", "dropout": 0})
    assert config == GPTConfig(n_layer=4, n_head=2, n_embd=64, bias=False, dropout=0.0)
    assert type(config.dropout) is float


def test_from_dict_round_trips_to_dict():
    config = GPTConfig(n_layer=3, n_head=4, n_embd=64, vocab_size=1000, padded_vocab_size=1024,
                       bias=False, tie_embeddings=False, layer_norm_epsilon=1e-6, attention="plain")
    assert GPTConfig.from_dict(config.to_dict()) == config


def test_from_dict_refuses_unknown_key_naming_it():
    with pytest.raises(UserError) as info:
        from_dict(GPTConfig, {"n_layer": 2, "n_lyer": 3}, where="model")
    assert "model.n_lyer" in str(info.value)


def test_from_dict_refuses_wrong_type_naming_it():
    with pytest.raises(UserError) as info:
        GPTConfig.from_dict({"n_layer": "abc"})
    assert "model.n_layer" in str(info.value)
    with pytest.raises(UserError, match="cfg.bias"):
        GPTConfig.from_dict({"bias": 3}, where="cfg")


def test_from_dict_validates_values():
    with pytest.raises(UserError, match="model.dropout"):
        GPTConfig.from_dict({"dropout": 1.5})


# ---- TOML ----------------------------------------------------------------------------------------


def test_toml_round_trip(tmp_path):
    config = GPTConfig(n_layer=3, n_head=4, n_embd=64, vocab_size=1000, padded_vocab_size=1024,
                       bias=False, dropout=0.1, tie_embeddings=False, layer_norm_epsilon=1e-6,
                       attention="plain")
    path = tmp_path / "model.toml"
    path.write_text(to_toml(config.to_dict()))
    values = load_toml(path)
    assert values["n_layer"] == 3 and values["bias"] is False and values["attention"] == "plain"
    assert GPTConfig.from_dict(values) == config


def test_toml_round_trip_omits_none(tmp_path):
    config = GPTConfig(n_layer=2)
    text = to_toml(config.to_dict())
    assert "padded_vocab_size" not in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert GPTConfig.from_dict(load_toml(path)) == config


def test_toml_round_trip_nested_tables_and_special_values(tmp_path):
    values = {
        "name": 'run "one"\\two\nthree\tfour é 🤖',
        "steps": 10,
        "lr": 6e-4,
        "big": 1e300,
        "tiny": 5e-324,
        "neg": -0.0,
        "inf": float("inf"),
        "flags": [True, False],
        "sizes": [1, 2, 3],
        "model": GPTConfig(n_layer=2).to_dict(),
        "data": {"path": "/tmp/x y", "weights": [0.5, 0.25]},
    }
    path = tmp_path / "run.toml"
    path.write_text(to_toml(values))
    loaded = load_toml(path)
    expected = dict(values)
    expected["model"] = {k: v for k, v in values["model"].items() if v is not None}
    assert loaded == expected
    assert GPTConfig.from_dict(loaded["model"]) == GPTConfig(n_layer=2)


@pytest.mark.parametrize("text", ["a\rb", "nul\x00", "esc\x1b[0m", "del\x7f"])
def test_toml_round_trip_control_characters(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(to_toml({"name": text}))
    assert load_toml(path) == {"name": text}


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("n_layer = = 4\n")
    with pytest.raises(UserError) as info:
        load_toml(path)
    assert str(path) in str(info.value)
    assert "TOML" in str(info.value)


def test_missing_toml_names_the_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(UserError) as info:
        load_toml(path)
    assert str(path) in str(info.value)


def test_non_utf8_toml_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(UserError) as info:
        load_toml(path)
    assert str(path) in str(info.value)


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('n_layer = 2\nn_head = 2\nn_embd = 32\nattention = "plain"\n')
    config = apply_overrides(GPTConfig.from_dict(load_toml(path)), ["n_layer=3"])
    assert (config.n_layer, config.n_head, config.n_embd, config.attention) == (3, 2, 32, "plain")


def test_toml_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("n_layer = 2\nwidth = 3\n")
    with pytest.raises(UserError, match="model.width"):
        GPTConfig.from_dict(load_toml(path))


def test_to_toml_refuses_unwritable_values():
    with pytest.raises(TypeError):
        to_toml({"x": object()})
