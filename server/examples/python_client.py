#!/usr/bin/env python3
"""Example switchyard client in Python, with Debian's python3-grpcio and python3-protobuf.

Debian has no grpc_tools, so the message classes come from `protoc --python_out` (package
protobuf-compiler) at start-up, and the calls are plain channel.unary_stream / unary_unary
with those classes' serializers -- no generated *_pb2_grpc.py needed.

  python3 server/examples/python_client.py --addr 127.0.0.1:50051 "Hello"
  python3 server/examples/python_client.py --addr 127.0.0.1:50051 --prompt-ids 1,5,9 \
      --max-new-tokens 16 --json
"""
import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO_DIR = os.path.join(HERE, "..", "..", "proto")


def load_messages(proto_dir):
    """Compiles inference.proto and health.proto to Python and imports them."""
    out = tempfile.mkdtemp(prefix="switchyard-pb2-")
    files = ["switchyard/v1/inference.proto", "grpc/health/v1/health.proto"]
    subprocess.run(["protoc", "--proto_path=" + proto_dir, "--python_out=" + out] + files,
                   check=True)
    sys.path.insert(0, out)
    inference = importlib.import_module("switchyard.v1.inference_pb2")
    # grpc/health/v1/health_pb2.py cannot be imported as grpc.health.v1 (the grpc package is
    # grpcio's), so load the file under a name of its own.
    path = os.path.join(out, "grpc", "health", "v1", "health_pb2.py")
    spec = importlib.util.spec_from_file_location("switchyard_health_pb2", path)
    health = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(health)
    return inference, health


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", nargs="?", help="prompt text")
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--prompt-ids", help="comma-separated token ids instead of text")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--proto-dir", default=DEFAULT_PROTO_DIR)
    ap.add_argument("--json", action="store_true", help="print one JSON object with the result")
    args = ap.parse_args()

    inference, health = load_messages(args.proto_dir)

    channel = grpc.insecure_channel(args.addr)
    grpc.channel_ready_future(channel).result(timeout=30)
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health.HealthCheckRequest.SerializeToString,
        response_deserializer=health.HealthCheckResponse.FromString)
    model_info = channel.unary_unary(
        "/switchyard.v1.Inference/GetModelInfo",
        request_serializer=inference.GetModelInfoRequest.SerializeToString,
        response_deserializer=inference.ModelInfo.FromString)
    generate = channel.unary_stream(
        "/switchyard.v1.Inference/Generate",
        request_serializer=inference.GenerateRequest.SerializeToString,
        response_deserializer=inference.GenerateResponse.FromString)

    status = check(health.HealthCheckRequest(), timeout=10).status
    info = model_info(inference.GetModelInfoRequest(), timeout=10)

    req = inference.GenerateRequest()
    if args.prompt_ids:
        req.token_ids.ids.extend(int(x) for x in args.prompt_ids.split(","))
    elif args.text:
        req.text = args.text
    else:
        ap.error("give a prompt (text or --prompt-ids)")
    req.sampling.max_new_tokens = args.max_new_tokens
    req.sampling.temperature = args.temperature
    req.sampling.ignore_eos = args.ignore_eos

    streamed_ids, streamed_text, completion = [], "", None
    for resp in generate(req, timeout=120):
        if resp.HasField("chunk"):
            streamed_ids.extend(resp.chunk.token_ids)
            streamed_text += resp.chunk.text
            if not args.json:
                print(resp.chunk.text, end="", flush=True)
        elif resp.HasField("completion"):
            completion = resp.completion
    if args.json:
        print(json.dumps({
            "health": health.HealthCheckResponse.ServingStatus.Name(status),
            "model_type": info.model_type,
            "vocab_size": info.vocab_size,
            "streamed_ids": streamed_ids,
            "streamed_text": streamed_text,
            "token_ids": list(completion.token_ids),
            "text": completion.text,
            "finish_reason": inference.FinishReason.Name(completion.finish_reason),
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        }))
    else:
        print()
        print("[%s, %d prompt + %d completion tokens]" % (
            inference.FinishReason.Name(completion.finish_reason), completion.prompt_tokens,
            completion.completion_tokens), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
