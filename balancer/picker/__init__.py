"""`kvfleet picker`: the balancer's routing as an Envoy external processor (ext_proc), answering
as the Gateway API Inference Extension's endpoint picker (EPP) does.

Envoy carries the requests; the picker decides where each goes and keeps the books:

    config.py    PickerConfig: the fleet's BalancerConfig plus the gRPC port and protocol names
    ext_proc.py  one HTTP request's ext_proc stream: headers -> body -> pick -> response phases
    envoy.py     an Envoy bootstrap for a picker and its fleet (fail-open or fail-closed)
    server.py    assembly: the balancer's objects, the gRPC server (ext_proc + grpc.health.v1),
                 the HTTP port with /metrics, /health and the admin API

Needs the `[picker]` extra (grpcio, xds-protos); nothing else in `balancer/` imports this package.
"""
