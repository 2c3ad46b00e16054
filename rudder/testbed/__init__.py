"""The testbed jobs run on: an emulated multi-host cluster on one machine (network namespaces, veth links shaped by
``tc``), :mod:`rudder.testbed.cluster`."""
