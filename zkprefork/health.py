"""What the registrar's health check (registrar/healthcheck.py) and the
workers agree on: during a live upgrade two masters' workers share the
listening socket, and the new master's check must count only answers from
its own workers (the old ones would vouch for the old code).

A check's request carries CHECK_FIELD; a worker answering one adds
ANSWER_FIELD, its master's pid (decimal). Neither is a secret: the pid is in
the node's data. A request from anyone else with CHECK_FIELD only learns it.
"""

CHECK_FIELD = 'Zkprefork-Check'  # the request's field (any value)
CHECK_KEY = CHECK_FIELD.upper().replace('-', '_')  # the same, as the parsed request's header key
ANSWER_FIELD = 'Zkprefork-Master'  # the response's field: the answering worker's master's pid
