"""The README's main job: stream an answer token by token, then run a tool call.

Run it through scripts/run.sh, which points OPENAI_COMPATIBLE_BASE_URL at your
endpoint or at a local llama.cpp server it starts (then with --local).
"""

from __future__ import annotations

import ast
import operator
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import openai_compat as oc

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculate(expression: str) -> float:
    """Evaluate an arithmetic expression such as "85.50 * 0.15".

    Args:
        expression: numbers joined by + - * / % ** and parentheses.
    """
    return _evaluate(ast.parse(expression.strip().rstrip("="), mode="eval").body)


def _evaluate(node: ast.expr) -> float:
    # A whitelist walk over the syntax tree: numbers and arithmetic only, no names,
    # calls or attributes, so a model cannot make it run anything.
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        if isinstance(node.op, ast.Pow) and abs(_evaluate(node.right)) > 100:
            raise ValueError("exponent too large")
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"not arithmetic: {ast.unparse(node)}")


SYSTEM = "You are a helpful assistant. Answer in two or three sentences."


def main() -> int:
    local = "--local" in sys.argv[1:]
    client = oc.Client()
    print(f"endpoint {client.config.base_url}, model {client.model}\n", flush=True)

    prompt = "Explain distributed computing in simple terms."
    print(f"== Streaming: {prompt} ==", flush=True)
    # Temperature 0 and a seed: the same answer every run. The system line keeps a
    # small model short: left to ramble for 200 tokens, SmolLM2-135M's answer (at the
    # server's default sampling) ended in one line repeated twenty times.
    for chunk in client.stream(prompt, system=SYSTEM, temperature=0, seed=42,
                               max_tokens=120):
        print(chunk.content, end="", flush=True)
    print("\n")

    question = "What is 85.50*0.15?"
    print(f"== A tool call: {question} ==", flush=True)
    # A call reaches the loop whole, so the model's reading and writing are silent.
    print("(the model reads the tools and examples, then writes its call: a few seconds)",
          flush=True)
    history: list[dict[str, object]] = []
    if local:
        # A 135M model calls tools reliably only after a few worked examples.
        from local_server import CALCULATOR_FEW_SHOT

        history = list(CALCULATOR_FEW_SHOT)
    with client.stream(question, messages=history, tools=[calculate], max_steps=3,
                       temperature=0, seed=42, max_tokens=200) as chunks:
        for chunk in chunks:
            if chunk.type == "tool_call" and chunk.tool_call:
                call = chunk.tool_call
                print(f"-> {call.name}({call.raw_arguments})", flush=True)
            elif chunk.type == "tool_result" and chunk.tool_result:
                outcome = chunk.tool_result
                print(f"<- {outcome.error or outcome.content}", flush=True)
            elif chunk.content:
                print(chunk.content, end="", flush=True)
        result = chunks.result
    print()
    if result is not None:
        calls = len(result.tool_calls)
        print(f"\n[{len(result.steps)} model calls, {calls} tool call{'s' * (calls != 1)}, "
              f"finish_reason {result.finish_reason}]")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except oc.OpenAICompatError as exc:
        print(f"\ndemo: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
