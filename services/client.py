"""`pagedserve generate`: streams one completion from a running server to stdout."""

import argparse
import os
import sys
import uuid

import grpc
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from services.common.proto_fields import set_given
from services.security_args import plain_api_keys


def build_request(args: argparse.Namespace) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams()
    set_given(sampling, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    request = generation_pb2.GenerateRequest(request_id=f"cli-{uuid.uuid4().hex[:12]}", sampling=sampling)
    if args.chat:
        request.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    return request


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.ssl_ca_certs is None and args.ssl_certfile is None:
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ssl_ca_certs.read_bytes() if args.ssl_ca_certs else None,
        private_key=args.ssl_keyfile.read_bytes() if args.ssl_keyfile else None,
        certificate_chain=args.ssl_certfile.read_bytes() if args.ssl_certfile else None,
    )
    options = (
        [] if args.ssl_server_name is None else [("grpc.ssl_target_name_override", args.ssl_server_name)]
    )
    return grpc.secure_channel(args.address, credentials, options=options)


def generate_to_stdout(args: argparse.Namespace) -> int:
    keys = plain_api_keys(args, os.environ)
    metadata = [("authorization", f"Bearer {keys[0]}")] if keys else []
    with _channel(args) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            for response in stub.Generate(build_request(args), metadata=metadata):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                if response.finish_reason:
                    reason = common_pb2.FinishReason.Name(response.finish_reason)
                    usage = response.usage
                    print(
                        f"\n[{reason}; prompt {usage.prompt_tokens} tokens, "
                        f"completion {usage.completion_tokens} tokens]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0
