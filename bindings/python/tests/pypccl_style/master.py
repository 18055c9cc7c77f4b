# A PCCL 1.0 (pypccl) master script, unchanged but for the address, which the
# test passes in the environment (a free port, so tests can run side by side).
# It only starts the master: the process keeps serving after the last line
# until it receives SIGINT or SIGTERM, as with PCCL 1.0.
import os

import pccl

master = pccl.MasterNode(listen_address=os.environ["PCCL_TEST_MASTER_ADDRESS"])
master.run()
