"""Prompt extension: a language model rewrites each prompt into a detailed video description before sampling.

The meaning of Wan2.1's ``generate.py`` options (``wan/utils/prompt_extend.py``), which Phantom's
``generate.py`` shares, as keys of the model JSON's ``inference`` section:

- ``use_prompt_extend``: rewrite the prompts first;
- ``prompt_extend_method``: ``local_qwen`` (a local transformers causal LM, Wan's ``QwenPromptExpander``;
  an instruction-tuned model such as Qwen2.5-7B/14B-Instruct) or ``dashscope`` (Alibaba Cloud's
  DashScope chat API, Wan's ``DashScopePromptExpander``);
- ``prompt_extend_model``: for ``local_qwen`` a local model directory (nothing is downloaded: a hub
  name is refused); for ``dashscope`` the API's model name (default ``qwen-plus``, Wan's);
- ``prompt_extend_target_lang``: the language of the rewrite, ``zh`` (Wan's name) or ``ch`` (Phantom's)
  for Chinese, ``en`` for English.

``check_prompt_extend`` finds every problem before any model loads. ``extend_prompts`` rewrites the
prompts (prompt i seeded with ``seed + i``, deterministic for a seed without touching the global RNG).
A rewrite that fails falls back to the original prompt, as Wan's ``generate.py`` does, but never
silently: the ``Extended`` result says so and ``extend_prompts`` prints it.

Image-conditioned tasks (i2v, flf2v, s2v) are extended from their text only: Wan's vision-language
expanders (Qwen2.5-VL, ``qwen-vl-max``), which also look at the images, are not implemented.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import torch

from mm.arguments import ConfigError

METHODS = ("local_qwen", "dashscope")
CHINESE = ("zh", "ch")  # Wan's name, Phantom's name
LANGS = CHINESE + ("en",)
MAX_NEW_TOKENS = 512  # Wan's QwenPromptExpander
DASHSCOPE_KEY_ENV = "DASH_API_KEY"  # Wan's DashScopePromptExpander reads these two
DASHSCOPE_URL_ENV = "DASH_API_URL"
DASHSCOPE_URL = "https://dashscope.aliyuncs.com/api/v1"  # Wan's default
DASHSCOPE_MODEL = "qwen-plus"  # Wan's default for text-only extension
DASHSCOPE_RETRIES = 4  # Wan's retry_times
PROBE_TIMEOUT_S = 3.0

_EN_SYSTEM_PROMPT = """\
You turn a short description into a detailed prompt for a text-to-video model. Keep what the user asked for and \
never change its meaning.
Rules:
1. When the description is brief, infer plausible details that complete the scene without departing from the intent.
2. Make the subject concrete: appearance, clothing, expression, how many there are, age or ethnicity where it \
matters, pose; then the setting, how things are arranged in space, the visual style and the shot size.
3. Write the whole prompt in English. Keep text in quotation marks or titles exactly as given, and keep every key \
fact of the input.
4. Use the style the user names; when none is named, choose the style that suits the scene best.
5. Bring out the motion in the description and say how the camera moves (pushes in, pulls back, pans, tracks, \
stays still).
6. Give the subject natural movements that fit what it is, described with plain, direct verbs.
7. Aim for 80 to 100 words.
8. Reply with the rewritten prompt only: no preamble, no notes, no surrounding quotation marks. If the input reads \
like a question or an instruction, rewrite it as a video description instead of answering it.
Example. Input: a fox in the snow. Output: Wildlife documentary footage at dawn: a red fox with a thick winter coat \
trots across a snow-covered meadow, its breath steaming in the cold air. It stops, tilts its head toward a sound \
under the snow, then leaps and plunges its front paws and snout into the drift. Pale pink light catches the frost on \
the pine trees behind it. Low-angle medium shot, the camera tracks the fox slowly from the side, then holds still \
as it jumps."""

_ZH_SYSTEM_PROMPT = """\
你的工作是把用户给出的简短描述改写成供文生视频模型使用的详细提示词。用户想要的内容必须保留，不得改变原意。
规则：
1. 描述过短时，在不偏离原意的前提下推断合理的细节，把画面补充完整。
2. 把主体写具体：外貌、衣着、表情、数量、必要时的年龄或种族、姿态；再写场景、空间位置关系、画面风格和镜头景别。
3. 全文用中文写。引号和书名号里的原文一字不改，输入中的关键信息全部保留。
4. 用户指定了风格就用该风格；没有指定时，选择最贴合画面的风格，或用纪实摄影风格；\
除非画面特别适合，不要选用插画风格；用户要求插画时才用插画风格。
5. 输入是古诗词时，突出中国古典元素，不要出现西方、现代或外国的场景。
6. 突出描述中的运动，并写明镜头怎样运动（推近、拉远、摇镜、跟拍、固定镜头等）。
7. 按主体的类别给它加上自然的动作，用简单直接的动词来写。
8. 改写后的提示词控制在80到100字左右。
9. 只输出改写后的提示词：不要开场白，不要说明，不要在外面加引号。输入看起来像问题或指令时，也把它改写成视频描述，不要去回答它。
示例。输入：雪地里的狐狸。输出：清晨的野生动物纪录片画面，一只披着厚实冬毛的赤狐在积雪的草地上小跑，\
呼出的白气在冷空气中散开。它停下脚步，侧耳倾听雪下的动静，随即跃起，把前爪和口鼻扎进雪堆。身后松树上的霜被淡粉色的晨光照亮。低角度中景，镜头从侧面缓缓跟拍，狐狸跃起时镜头静止。"""


def system_prompt(target_lang: str) -> str:
    """The system prompt of a rewrite into ``target_lang`` (one of LANGS): mm's own wording of the rules
    Wan's text-to-video system prompts give (``LM_ZH_SYS_PROMPT``, ``LM_EN_SYS_PROMPT``)."""
    return _ZH_SYSTEM_PROMPT if target_lang in CHINESE else _EN_SYSTEM_PROMPT


def chat_messages(prompt: str, target_lang: str) -> list[dict[str, str]]:
    """The chat of one rewrite: the system prompt, then the user's prompt."""
    return [{"role": "system", "content": system_prompt(target_lang)}, {"role": "user", "content": prompt}]


@dataclass(frozen=True)
class Extended:
    """One prompt's extension: ``extended`` is the prompt to sample with, the rewrite where ``ok``, else the
    original ``prompt`` (``message`` says why)."""

    prompt: str
    extended: str
    ok: bool
    message: str = ""


# ---- checks, before any model loads ----------------------------------------------------------------------------

def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a TCP connection to ``url``'s host and port cannot be opened within ``timeout`` seconds, or None."""
    parts = urlsplit(url)
    if not parts.hostname:
        return f"{url!r} names no host"
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError as e:
        return f"{url!r}: {e}"
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as e:  # name resolution, refusal, timeout
        return f"{parts.hostname}:{port} cannot be reached within {timeout:g} s ({type(e).__name__}: {e})"


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _local_model_problems(model) -> list[str]:
    key = "inference.prompt_extend_model"
    wanted = ("valid: the directory of a local transformers causal language model with a chat template (e.g. a "
              "downloaded Qwen2.5-7B-Instruct); hub names are not downloaded")
    if model is None or model == "":
        return [f"{key}: not given; prompt_extend_method 'local_qwen' needs a model; {wanted}"]
    if not isinstance(model, str):
        return [f"{key} = {model!r}; {wanted}"]
    path = Path(model)
    if not path.exists():
        return [f"{key} = {model!r}: no such directory; {wanted}"]
    if not path.is_dir():
        return [f"{key} = {model!r}: not a directory; {wanted}"]
    if not (path / "config.json").is_file():
        return [f"{key} = {model!r}: no config.json in it; {wanted}"]
    problems = []
    try:
        config = json.loads((path / "config.json").read_text())
        model_type = config.get("model_type") if isinstance(config, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{key} = {model!r}: its config.json cannot be read ({type(e).__name__}: {e}); {wanted}"]
    if model_type not in _causal_lm_types():
        problems.append(f"{key} = {model!r}: config.json's model_type {model_type!r} is not a causal language model of "
                        f"transformers (AutoModelForCausalLM; vision-language models are not used here); {wanted}")
    tokenizer_config = path / "tokenizer_config.json"
    if not tokenizer_config.is_file() and not (path / "tokenizer.json").is_file():
        problems.append(f"{key} = {model!r}: no tokenizer in it (tokenizer_config.json or tokenizer.json); {wanted}")
    else:
        try:
            in_config = tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
            in_config = False
        if not in_config and not any((path / f).is_file() for f in ("chat_template.jinja", "chat_template.json")):
            problems.append(f"{key} = {model!r}: its tokenizer has no chat template (chat_template.jinja, or "
                            f"chat_template in tokenizer_config.json): an instruction-tuned model is needed; {wanted}")
    return problems


def _dashscope_problems(model, environ: Mapping[str, str]) -> list[str]:
    head = "inference.prompt_extend_method = 'dashscope'"
    problems = []
    if model is not None and (not isinstance(model, str) or not model):
        problems.append(f"inference.prompt_extend_model = {model!r}; valid with dashscope: a DashScope model name "
                        f"(default {DASHSCOPE_MODEL!r})")
    key_set = bool(environ.get(DASHSCOPE_KEY_ENV))
    if not key_set:
        problems.append(f"{head} needs the {DASHSCOPE_KEY_ENV} environment variable (the DashScope API key); it is not "
                        "set; valid: set it, or prompt_extend_method 'local_qwen'")
    package = _has_package("dashscope")
    if not package:
        problems.append(f"{head} needs the dashscope package (pip install dashscope); it is not installed; valid: "
                        "install it, or prompt_extend_method 'local_qwen'")
    if key_set and package:
        url = environ.get(DASHSCOPE_URL_ENV) or DASHSCOPE_URL
        reason = _unreachable(url)
        if reason is not None:
            problems.append(f"{head} needs the network: the DashScope API at {url} ({DASHSCOPE_URL_ENV} or the "
                            f"default): {reason}; valid: a machine that reaches it, or prompt_extend_method "
                            "'local_qwen'")
    return problems


def check_prompt_extend(method, model, target_lang, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Every problem of a prompt extension's settings, each naming the inference key, its value and what is
    valid; found before any model loads.

    ``local_qwen``: ``model`` must be a local transformers causal-LM directory (config.json with a model type
    of AutoModelForCausalLM, a tokenizer with a chat template). ``dashscope``: ``environ`` must hold
    DASH_API_KEY, the ``dashscope`` package must be installed, and the API host (DASH_API_URL, else DashScope's
    public URL) must accept a TCP connection within PROBE_TIMEOUT_S seconds (probed only when key and package
    are there). DashScope cannot be tested without its package and the network: there it is refused.
    """
    problems = []
    if target_lang not in LANGS:
        problems.append(f"inference.prompt_extend_target_lang = {target_lang!r}; valid: zh or ch (Chinese; Wan's and "
                        "Phantom's names), en")
    if method == "local_qwen":
        problems += _local_model_problems(model)
    elif method == "dashscope":
        problems += _dashscope_problems(model, environ)
    else:
        problems.append(f"inference.prompt_extend_method = {method!r}; valid: {', '.join(METHODS)}")
    return problems


# ---- extenders ---------------------------------------------------------------------------------------------------

@contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """The CPU generator and ``device``'s (where it is not the CPU) seeded with ``seed``, inside
    ``torch.random.fork_rng``: their states are restored on exit."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        with module.device(index):
            module.manual_seed(seed)
        yield


class PromptExtender:
    """Rewrites prompts; ``rewrite`` raises where it cannot, ``extend`` falls back to the original prompt."""

    def rewrite(self, prompt: str, target_lang: str, seed: int) -> str:
        raise NotImplementedError

    def extend(self, prompt: str, target_lang: str, seed: int) -> Extended:
        """``prompt`` rewritten into ``target_lang``; where that fails (an error, or no text), the original prompt
        with ok False and the reason (Wan's fallback)."""
        try:
            text = self.rewrite(prompt, target_lang, seed).strip()
        except Exception as e:  # the fallback covers any failure of the extender, reported in the message
            return Extended(prompt, prompt, False, f"the extension failed ({type(e).__name__}: {e}); the original "
                                                   "prompt is used")
        if not text:
            return Extended(prompt, prompt, False, "the extension gave no text; the original prompt is used")
        return Extended(prompt, text, True)

    def close(self) -> None:
        """Free what the extender holds."""


class LocalLMExtender(PromptExtender):
    """Wan's ``QwenPromptExpander`` (text only): a local transformers causal LM (``AutoTokenizer`` +
    ``AutoModelForCausalLM`` from ``model_dir``, nothing downloaded) in ``dtype`` (None: the checkpoint's own,
    Wan's ``"auto"``) on ``device``. A rewrite is the chat of ``chat_messages`` rendered by the tokenizer's chat
    template, generated with the model's own generation config (its generation_config.json) and at most
    ``max_new_tokens`` new tokens, seeded (CPU and device generators, inside ``torch.random.fork_rng``: the
    global RNG state is left as it was)."""

    def __init__(self, model_dir: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto", local_files_only=True)
        self.model = model.to(self.device).eval()

    def rewrite(self, prompt: str, target_lang: str, seed: int) -> str:
        text = self.tokenizer.apply_chat_template(chat_messages(prompt, target_lang), tokenize=False,
                                                  add_generation_prompt=True)
        inputs = self.tokenizer([text], return_tensors="pt").to(self.device)
        with torch.no_grad(), seeded(self.device, seed):
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def close(self) -> None:
        """Drop the model and the tokenizer and empty the device's cache."""
        self.model = self.tokenizer = None
        gc.collect()
        if self.device.type != "cpu":
            torch.get_device_module(self.device.type).empty_cache()


class DashScopeExtender(PromptExtender):
    """Wan's ``DashScopePromptExpander`` (text only): ``dashscope.Generation.call`` with ``chat_messages``, the
    seed and ``result_format='message'``, up to ``retries`` attempts; the API key from DASH_API_KEY, the API's
    URL from DASH_API_URL (else DashScope's public URL). Built only after ``check_prompt_extend`` passed; it
    cannot be tested without the dashscope package and the network."""

    def __init__(self, model_name: str | None = None, environ: Mapping[str, str] = os.environ,
                 retries: int = DASHSCOPE_RETRIES):
        import dashscope

        self.dashscope = dashscope
        self.model_name = model_name or DASHSCOPE_MODEL
        self.retries = retries
        dashscope.api_key = environ[DASHSCOPE_KEY_ENV]
        dashscope.base_http_api_url = environ.get(DASHSCOPE_URL_ENV) or DASHSCOPE_URL

    def rewrite(self, prompt: str, target_lang: str, seed: int) -> str:
        last = "no attempt made"
        for _ in range(max(1, self.retries)):
            try:
                response = self.dashscope.Generation.call(self.model_name, messages=chat_messages(prompt, target_lang),
                                                          seed=seed, result_format="message")
            except Exception as e:  # retried like Wan's; the last error is reported
                last = f"{type(e).__name__}: {e}"
                continue
            if response.status_code == HTTPStatus.OK:
                return response.output["choices"][0]["message"]["content"]
            last = (f"HTTP {response.status_code} {getattr(response, 'code', '')}: "
                    f"{getattr(response, 'message', '')}")
        raise RuntimeError(f"DashScope model {self.model_name!r}, {max(1, self.retries)} attempts; the last: {last}")


def build_extender(method: str, model: str | None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   max_new_tokens: int = MAX_NEW_TOKENS, environ: Mapping[str, str] = os.environ) -> PromptExtender:
    """The extender of ``method`` (settings already checked by ``check_prompt_extend``)."""
    if method == "local_qwen":
        return LocalLMExtender(model, device, dtype, max_new_tokens)
    if method == "dashscope":
        return DashScopeExtender(model, environ)
    raise ValueError(f"prompt_extend_method = {method!r}; valid: {', '.join(METHODS)}")


def extend_prompts(prompts: Sequence[str], method: str, model: str | None, target_lang: str, seed: int,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None, *,
                   max_new_tokens: int = MAX_NEW_TOKENS, environ: Mapping[str, str] = os.environ) -> list[Extended]:
    """Every prompt extended (prompt i seeded with ``seed + i``), one line per prompt on stdout.

    The settings are checked first (ConfigError listing every problem, before any model is built); the
    extender is built once and freed (with the device's cache) afterwards. A prompt whose extension fails keeps
    its original text (``Extended.ok`` False), its line saying why.
    """
    problems = check_prompt_extend(method, model, target_lang, environ)
    if problems:
        raise ConfigError(problems)
    extender = build_extender(method, model, device, dtype, max_new_tokens, environ)
    results = []
    try:
        for i, prompt in enumerate(prompts):
            result = extender.extend(prompt, target_lang, seed + i)
            where = f"prompt extension {i + 1}/{len(prompts)} (seed {seed + i})"
            if result.ok:
                print(f"{where}: {result.extended}", flush=True)
            else:
                print(f"{where}: {result.message}: {result.prompt}", flush=True)
            results.append(result)
    finally:
        extender.close()
    return results
